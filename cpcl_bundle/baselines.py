# Copyright (c) 2026 The CPCL bundle authors
# SPDX-License-Identifier: Apache-2.0
"""The baselines of the paper's Tables I and IV as loss terms, and the released code's stability term.

Each term follows the code base the paper's splits and most of its baselines come from: SSL4MIS
(github.com/HiLab-git/SSL4MIS, ``code/train_*_3D.py``) or the method's own released code where SSL4MIS has
none; the docstrings say which, and where this bundle differs. Their consistency weight is the trainer's
``lambda(t)`` (``w_max`` 0.1, the ``consistency`` 0.1 of those scripts) times the term's weight. The pure
functions come first, each checked against a literal computation in ``tests/test_baselines.py``.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from cpcl_bundle.losses import gaussian_rampup
from cpcl_bundle.networks import add_dropout, unwrap
from cpcl_bundle.terms import Step, Term, add_noise, register_term

__all__ = [
    "predictive_entropy",
    "uamt_threshold",
    "masked_mse",
    "entropy_loss",
    "mix",
    "heaviside",
    "soft_dice_loss",
    "raw_mse",
    "mc_dropout",
    "Discriminator3D",
    "UncertaintyAwareMeanTeacherTerm",
    "EntropyMinimisationTerm",
    "InterpolationConsistencyTerm",
    "AdversarialTerm",
    "DualTaskMutualTerm",
    "ReleasedStabilityTerm",
]


# ---------------------------------------------------------------------------------------------- pure functions
def predictive_entropy(probs: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``-sum_k p_k log(p_k + eps)`` over the class axis (dim 1, kept): UA-MT's uncertainty of the mean of the
    teacher's stochastic predictions (natural log, not normalised)."""
    return -(probs * torch.log(probs + eps)).sum(1, keepdim=True)


def uamt_threshold(step: float, total: float, num_classes: int = 2) -> float:
    """UA-MT's uncertainty threshold ``(0.75 + 0.25 r(t)) ln K``, ``r`` the sigmoid ramp-up over the run
    (``exp(-5 (1 - t/T)^2)``): from 0.75 ln 2 to ln 2 for two classes (ln K is the entropy's maximum)."""
    return (0.75 + 0.25 * gaussian_rampup(step, total, 1.0)) * math.log(num_classes)


def masked_mse(student_probs: torch.Tensor, teacher_probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """UA-MT's masked consistency: ``sum(mask (p_s - p_t)^2) / (K sum(mask) + 1e-16)``, the mean squared error
    over the certain voxels (``mask`` ``[B, 1, *S]`` broadcast over the ``K`` classes)."""
    num_classes = student_probs.shape[1]
    dist = (student_probs - teacher_probs) ** 2
    return (mask * dist).sum() / (num_classes * mask.sum() + 1e-16)


def entropy_loss(probs: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """SSL4MIS ``losses.entropy_loss``: the mean over voxels of ``-sum_k p_k log(p_k + eps) / ln K``."""
    return (predictive_entropy(probs, eps)[:, 0] / math.log(probs.shape[1])).mean()


def mix(a: torch.Tensor, b: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """``a (1 - lam) + b lam`` (ICT's interpolation), ``lam`` broadcast per image."""
    return a * (1.0 - lam) + b * lam


def heaviside(sdf: torch.Tensor, k: float = 1500.0) -> torch.Tensor:
    """DTC/DTML's smooth Heaviside from a signed distance (negative inside) to a mask: ``sigmoid(-k sdf)``."""
    return torch.sigmoid(-k * sdf)


def soft_dice_loss(score: torch.Tensor, target: torch.Tensor, smooth: float = 1e-5) -> torch.Tensor:
    """The Dice loss of the UA-MT/DTC/DTML code bases, over the whole batch:
    ``1 - (2 sum(s t) + smooth) / (sum(s^2) + sum(t^2) + smooth)``."""
    target = target.float()
    intersect = (score * target).sum()
    return 1.0 - (2.0 * intersect + smooth) / ((score * score).sum() + (target * target).sum() + smooth)


def raw_mse(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """The released CPCL code's "stability" loss: ``mean((teacher - student)^2)`` on raw logits."""
    return ((teacher_logits.to(student_logits.dtype) - student_logits) ** 2).mean()


@contextlib.contextmanager
def mc_dropout(network: torch.nn.Module, layers: Sequence[str], p: float) -> Iterator[None]:
    """Channel dropout (``dropout3d``, always on) on the outputs of ``layers`` while the context is open
    (:func:`cpcl_bundle.networks.add_dropout`): stochastic passes of a network that has no dropout of its own,
    whose ``state_dict`` and exported form stay untouched."""
    handles = add_dropout(network, p, layers, "channel", always=True)
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class Discriminator3D(torch.nn.Module):
    """DAN's discriminator as SSL4MIS's ``FC3DDiscriminator`` (``networks/discriminator.py``): the probability
    map and the image each through a 4^3 stride-2 convolution to ``ndf`` channels, added, then LeakyReLU(0.2)
    and Dropout3d(0.5) between three more stride-2 convolutions (``2 ndf``, ``4 ndf``, ``8 ndf``), average
    pooling and a linear layer to two logits (0 = unlabeled, 1 = labeled). SSL4MIS pools a fixed 6^3 window,
    the whole map at its 96^3 crops; here the pooling is global, which is the same there and fits any crop."""

    def __init__(self, num_classes: int, in_channels: int = 1, ndf: int = 64) -> None:
        super().__init__()
        self.conv0 = torch.nn.Conv3d(num_classes, ndf, 4, 2, 1)
        self.conv1 = torch.nn.Conv3d(in_channels, ndf, 4, 2, 1)
        self.conv2 = torch.nn.Conv3d(ndf, ndf * 2, 4, 2, 1)
        self.conv3 = torch.nn.Conv3d(ndf * 2, ndf * 4, 4, 2, 1)
        self.conv4 = torch.nn.Conv3d(ndf * 4, ndf * 8, 4, 2, 1)
        self.classifier = torch.nn.Linear(ndf * 8, 2)
        self.act, self.dropout = torch.nn.LeakyReLU(0.2, inplace=True), torch.nn.Dropout3d(0.5)

    def forward(self, probs: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        x = self.dropout(self.act(self.conv0(probs) + self.conv1(image)))
        x = self.dropout(self.act(self.conv2(x)))
        x = self.dropout(self.act(self.conv3(x)))
        x = self.act(self.conv4(x))
        return self.classifier(x.mean(dim=tuple(range(2, x.ndim))))


# ---------------------------------------------------------------------------------------------- terms
@register_term
class UncertaintyAwareMeanTeacherTerm(Term):
    """UA-MT (Yu et al., MICCAI 2019), as its code (``yulequan/UA-MT``, ``train_LA_meanteacher_certainty_unlabel.py``):

    * the target: one teacher pass on the unlabeled images plus clipped noise ``clamp(N(0, 0.1^2), -0.2, 0.2)``;
    * the uncertainty: ``T = 8`` more stochastic teacher passes (the unlabeled batch stacked twice, ``T/2``
      passes, fresh noise each), their mean softmax, its entropy (:func:`predictive_entropy`);
    * the loss: MSE between the student's and the target's softmax on the voxels whose uncertainty is below
      :func:`uamt_threshold` (0.75 ln 2 to ln 2 over the run), :func:`masked_mse`.

    UA-MT's teacher runs with dropout (its V-Net: Dropout3d(0.5) on the bottleneck and before the output
    convolution); the bundle's U-Net has none, so the teacher passes of this term get the same Dropout3d(0.5)
    on the bottleneck (``uamt_dropout_layers``) and the last decoder stage through forward hooks
    (:func:`mc_dropout`), and ``network_def`` stays dropout-free. The student runs without dropout.
    Logged: ``uamt_threshold`` and ``uamt_certain`` (fraction of voxels kept).
    """

    name = "uamt"
    needs = frozenset({"unlabeled", "ema", "student_unlabeled"})

    def __init__(
        self,
        weight: float = 1.0,
        noise_std: float = 0.1,
        noise_clip: float = 0.2,
        uamt_passes: int = 8,
        uamt_dropout: float = 0.5,
        uamt_dropout_layers: Sequence[str] = ("bottleneck", "decoder_full"),
    ) -> None:
        super().__init__(weight)
        if int(uamt_passes) < 2 or int(uamt_passes) % 2:
            raise ValueError(f"uamt_passes must be even and at least 2, got {uamt_passes}")
        self.noise, self.passes = (float(noise_std), float(noise_clip)), int(uamt_passes)
        self.dropout, self.dropout_layers = float(uamt_dropout), tuple(uamt_dropout_layers)

    @torch.no_grad()
    def targets(self, step: Step) -> tuple[torch.Tensor, torch.Tensor]:
        """``(teacher softmax on noisy x_u, uncertainty [B, 1, *S])`` from ``1 + T`` stochastic teacher passes."""
        x_u, teacher = step.x_u, step.teacher_net
        with mc_dropout(teacher, self.dropout_layers, self.dropout):
            target = torch.softmax(step.forward(teacher, add_noise(x_u, *self.noise)).float(), 1)
            stacked = x_u.repeat(2, *([1] * (x_u.ndim - 1)))
            preds = [
                torch.softmax(step.forward(teacher, add_noise(stacked, *self.noise)).float(), 1)
                for _ in range(self.passes // 2)
            ]
        mean = torch.cat(preds).reshape(self.passes, *target.shape).mean(0)
        return target, predictive_entropy(mean)

    def loss(self, step: Step) -> tuple[torch.Tensor, dict[str, float]]:
        target, uncertainty = self.targets(step)
        threshold = uamt_threshold(step.iteration - 1, step.total_iterations, target.shape[1])
        mask = (uncertainty < threshold).float()
        student = torch.softmax(step.student("unlabeled").float(), 1)
        return masked_mse(student, target, mask), {"uamt_threshold": threshold, "uamt_certain": float(mask.mean())}


@register_term
class EntropyMinimisationTerm(Term):
    """Entropy minimisation (Vu et al., CVPR 2019) as SSL4MIS ``train_entropy_minimization_3D.py``: the mean
    normalised entropy (:func:`entropy_loss`) of the student's softmax on the whole batch, labeled and
    unlabeled images. No teacher."""

    name = "entropy_min"
    needs = frozenset({"unlabeled", "student_unlabeled"})

    def loss(self, step: Step) -> tuple[torch.Tensor, dict[str, float]]:
        logits = torch.cat([step.student(), step.student("unlabeled")]).float()
        return entropy_loss(torch.softmax(logits, 1)), {}


@register_term
class InterpolationConsistencyTerm(Term):
    """ICT (Verma et al., IJCAI 2019) as SSL4MIS ``train_interpolation_consistency_training_3D.py``: the first
    and second half of the unlabeled batch are mixed with ``lam ~ Beta(ict_alpha, ict_alpha)`` per pair
    (``ict_alpha`` 0.2), the student sees the mixed images (in its one pass with the labeled ones), and its
    softmax is pulled to the same mix of the teacher's softmax on the unmixed images (clean input): MSE over all
    elements. The unlabeled batch needs at least two images."""

    name = "ict"
    needs = frozenset({"unlabeled", "teacher"})

    def __init__(self, weight: float = 1.0, ict_alpha: float = 0.2) -> None:
        super().__init__(weight)
        self.alpha = float(ict_alpha)
        self._lam: torch.Tensor | None = None

    def student_inputs(self, step: Step) -> dict[str, torch.Tensor]:
        x_u = step.x_u
        half = x_u.shape[0] // 2
        if half < 1:
            raise ValueError(f"ICT mixes pairs of unlabeled images: the unlabeled batch has {x_u.shape[0]}")
        beta = torch.distributions.Beta(torch.tensor(self.alpha), torch.tensor(self.alpha))
        self._lam = beta.sample((half,)).reshape(half, *([1] * (x_u.ndim - 1))).to(x_u)
        return {"ict_mixed": mix(x_u[:half], x_u[half : 2 * half], self._lam)}

    def loss(self, step: Step) -> tuple[torch.Tensor, dict[str, float]]:
        probs_u = step.teacher_probs()
        half = self._lam.shape[0]
        target = mix(probs_u[:half], probs_u[half : 2 * half], self._lam.float())
        student = torch.softmax(step.student("ict_mixed").float(), 1)
        return F.mse_loss(student, target), {"ict_lambda": float(self._lam.float().mean())}


class _OwnModule(Term):
    """A term with a module and an optimiser of its own, built lazily at its first step (when the numbers of
    classes and channels are known) and saved in resume checkpoints; a state loaded before is applied then."""

    def __init__(self, weight: float = 1.0) -> None:
        super().__init__(weight)
        self.module: torch.nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self._pending: dict[str, Any] | None = None
        self.device: torch.device | None = None

    def attach(self, trainer: Any) -> None:
        self.trainer = trainer

    def build(self, step: Step) -> None:
        raise NotImplementedError

    def ready(self, step: Step) -> None:
        if self.module is None:
            if self._pending is None:
                self.build(step)
                return
            with torch.random.fork_rng(devices=[]):  # resumed: the restored RNG already had the initialisation
                self.build(step)
            self.load_state_dict(self._pending)

    def state_dict(self) -> dict[str, Any]:
        if self.module is None:
            return self._pending or {}
        return {"module": self.module.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.module is None or not state:
            self._pending = dict(state) or None
            return
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        self._pending = None


@register_term
class AdversarialTerm(_OwnModule):
    """DAN (Zhang et al., MICCAI 2017) as SSL4MIS ``train_adversarial_network_3D.py``: a discriminator
    (:class:`Discriminator3D`) tells (softmax, image) pairs of labeled images (1) from unlabeled ones (0). The
    segmenter's term is the discriminator's cross entropy of the unlabeled pairs against "labeled" (discriminator
    in eval mode); after the segmenter's step, the discriminator is trained on this step's images with a fresh
    no-grad pass of the updated segmenter, with its own Adam (``dan_lr`` 1e-4, betas 0.9/0.99). Logged: the
    discriminator's loss of the previous step (``dan_d_loss``). The discriminator and its optimiser are saved in
    resume checkpoints (``term_dan``); under multi-GPU training they are not wrapped in DDP (each rank trains
    its own copy on its own batches)."""

    name = "dan"
    needs = frozenset({"unlabeled", "student_unlabeled"})

    def __init__(self, weight: float = 1.0, dan_lr: float = 1e-4) -> None:
        super().__init__(weight)
        self.lr = float(dan_lr)
        self.d_loss = 0.0

    def build(self, step: Step) -> None:
        num_classes, channels = step.student().shape[1], step.x_u.shape[1]
        self.module = Discriminator3D(num_classes, channels).to(step.x_u.device)
        self.optimizer = torch.optim.Adam(self.module.parameters(), lr=self.lr, betas=(0.9, 0.99))

    def loss(self, step: Step) -> tuple[torch.Tensor, dict[str, float]]:
        self.ready(step)
        self.module.eval()
        probs_u = torch.softmax(step.student("unlabeled").float(), 1)
        logits = self.module(probs_u, step.x_u.float())
        labeled = torch.ones(logits.shape[0], dtype=torch.long, device=logits.device)
        return F.cross_entropy(logits, labeled), {"dan_d_loss": self.d_loss}

    def after_step(self, step: Step, finite: bool) -> None:
        self.optimizer.zero_grad(set_to_none=True)  # drops the gradient the segmenter's backward left here
        if not finite:
            return
        images = torch.cat([step.x_l, step.x_u])
        network, was_training = step.student_net, step.student_net.training
        network.eval()
        with torch.no_grad():
            probs = torch.softmax(step.forward(network, images).float(), 1)
        network.train(was_training)
        self.module.train()
        targets = torch.cat([torch.ones(step.x_l.shape[0]), torch.zeros(step.x_u.shape[0])]).long()
        d_loss = F.cross_entropy(self.module(probs, images.float()), targets.to(images.device))
        d_loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.d_loss = float(d_loss.detach())


@register_term
class DualTaskMutualTerm(Term):
    """DTML (Zhang & Zhang, 2021, dual-task mutual learning) as its code (``YichiZhang98/DTML``,
    ``train_la_dtml.py``): a second network of the segmenter's architecture (its own initialisation, ``K - 1``
    outputs through tanh: a signed distance per foreground class, negative inside). Its supervised loss
    (:meth:`auxiliary_loss`, added without ``lambda``) is the Dice loss (:func:`soft_dice_loss`) of its
    Heaviside mask (:func:`heaviside`, k = 1500) on the labeled images; the mutual consistency is the MSE between
    that mask and the segmenter's foreground softmax on all images, with gradient to both networks. DTML
    back-propagates the consistency once from each network's loss, so each network gets it twice at a weight
    of 1.0: ``weight`` 20 on ``lambda``'s ``w_max`` 0.1. DTML's code also computes an L1 loss to the
    ground-truth distance map but never uses it; neither does this term.

    DTML trains the second network with an SGD of the same settings as the segmenter's; here it is a parameter
    group of the segmenter's optimiser (added when the term is attached, so it follows the LR schedule, AMP's
    gradient scaling and the non-finite guard, and is saved with the optimiser). The network itself is saved in
    resume checkpoints (``term_dtml``); export, inference and MONAI Label see only the segmenter. Under
    multi-GPU training the second network is not wrapped in DDP: its gradients are not averaged across ranks.
    """

    name = "dtml"
    needs = frozenset({"unlabeled", "student_unlabeled"})

    def __init__(self, weight: float = 20.0, heaviside_k: float = 1500.0) -> None:
        super().__init__(weight)
        self.k = float(heaviside_k)
        self.module: torch.nn.Module | None = None
        self._mask: torch.Tensor | None = None

    def attach(self, trainer: Any) -> None:
        net = copy.deepcopy(unwrap(trainer.network))
        final = getattr(net, "final_conv", None)
        if not isinstance(final, torch.nn.Conv3d):
            raise TypeError(f"DTML needs a network with a final_conv Conv3d (BasicUNet), got {type(net).__name__}")
        for module in net.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
        net.final_conv = torch.nn.Conv3d(final.in_channels, final.out_channels - 1, 1).to(final.weight.device)
        self.module = net.train()
        trainer.optimizer.add_param_group({"params": list(net.parameters())})

    def loss(self, step: Step) -> tuple[torch.Tensor, dict[str, float]]:
        images = torch.cat([step.x_l, step.x_u])
        self._mask = heaviside(torch.tanh(step.forward(self.module, images).float()), self.k)
        probs = torch.softmax(torch.cat([step.student(), step.student("unlabeled")]).float(), 1)
        return F.mse_loss(self._mask, probs[:, 1:]), {}

    def auxiliary_loss(self, step: Step) -> torch.Tensor:
        n = step.x_l.shape[0]
        classes = torch.arange(1, self._mask.shape[1] + 1, device=step.y_l.device)
        onehot = step.y_l.long() == classes.view(1, -1, *([1] * (step.y_l.ndim - 2)))
        return soft_dice_loss(self._mask[:n], onehot)

    def after_step(self, step: Step, finite: bool) -> None:
        self._mask = None

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])


@register_term
class ReleasedStabilityTerm(Term):
    """The released CPCL code's "stability" loss as it is (``lemoshu/CPCL``, ``train_CPCL_general_3D.py``): the
    teacher sees all images of the step (labeled and unlabeled) with clipped noise, and the loss is the MSE
    between its raw logits and the student's on the clean images (:func:`raw_mse`), weighted like L2U."""

    name = "stability_released"
    needs = frozenset({"unlabeled", "ema", "student_unlabeled"})

    def __init__(self, weight: float = 1.0, noise_std: float = 0.1, noise_clip: float = 0.2) -> None:
        super().__init__(weight)
        self.noise = (float(noise_std), float(noise_clip))

    def loss(self, step: Step) -> tuple[torch.Tensor, dict[str, float]]:
        images = torch.cat([step.x_l, step.x_u])
        with torch.no_grad():
            teacher = step.forward(step.teacher_net, add_noise(images, *self.noise)).float()
        student = torch.cat([step.student(), step.student("unlabeled")]).float()
        return raw_mse(student, teacher), {}
