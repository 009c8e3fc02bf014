# Copyright (c) 2026 The CPCL bundle authors
# SPDX-License-Identifier: Apache-2.0
"""Hooks on the backbone (``network_def`` in configs/train.json, MONAI's ``BasicUNet``): the feature tap that gives
CPCL its ``F``, and the reference code bases' dropout; neither changes the state dict."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "FEATURE_LAYERS",
    "DROPOUT_KINDS",
    "REFERENCE_DROPOUT_LAYERS",
    "FeatureTap",
    "unwrap",
    "forward_with_features",
    "add_dropout",
]

#: Aliases for the layers whose output can serve as ``F``. ``encoder`` is the paper's choice (the last
#: convolution of the encoder: 256 channels at 1/16 of the crop); ``decoder_half`` is the released code's
#: kind of layer (a decoder stage at half resolution, 32 channels).
FEATURE_LAYERS = {"encoder": "down_4", "bottleneck": "down_4", "decoder_half": "upcat_2", "decoder_full": "upcat_1"}

#: Where the references' backbones drop out: on the bottleneck and on the last decoder stage, before the output
#: convolution. The V-Net of UA-MT, of CPCL's released code and of DTML (``has_dropout=True``): ``Dropout3d(0.5)``
#: on ``x5`` and on ``x9``; SSL4MIS's ``unet_3D``: ``Dropout(0.3)`` on ``center`` and on ``up1``.
REFERENCE_DROPOUT_LAYERS = ("bottleneck", "decoder_full")

#: ``"channel"``: whole feature maps (``Dropout3d``, the V-Net's); ``"element"``: single values (``Dropout``,
#: SSL4MIS's ``unet_3D``).
DROPOUT_KINDS = {"channel": F.dropout3d, "element": F.dropout}


def unwrap(network: torch.nn.Module) -> torch.nn.Module:
    """The module inside ``DistributedDataParallel`` / ``DataParallel`` / ``torch.compile`` wrappers."""
    while True:
        if isinstance(network, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            network = network.module
        elif hasattr(network, "_orig_mod"):
            network = network._orig_mod
        else:
            return network


class FeatureTap:
    """Captures the output of one named layer during a forward pass, with a forward hook.

    A hook adds nothing to the network: ``state_dict()`` keys and values are unchanged, so a checkpoint of a
    tapped network loads into the plain network that inference and MONAI Label build. Use as a context
    manager (the hook is removed on exit)::

        with FeatureTap(net, "encoder") as tap:
            logits = net(x)
        features = tap.features

    Args:
        network: the network (wrappers such as DDP are looked through).
        layer: a name of ``network.named_modules()`` or an alias of :data:`FEATURE_LAYERS`.
    """

    def __init__(self, network: torch.nn.Module, layer: str = "encoder") -> None:
        name = FEATURE_LAYERS.get(layer, layer)
        modules = dict(unwrap(network).named_modules())
        if name not in modules or name == "":
            choices = sorted(set(FEATURE_LAYERS) | {k for k in modules if k and "." not in k})
            raise ValueError(
                f"feature layer {layer!r} is not in {type(unwrap(network)).__name__}; choose from {choices}"
            )
        self.layer = name
        self.module = modules[name]
        self.features: torch.Tensor | None = None
        self._handle = None

    def _hook(self, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        self.features = output

    def __enter__(self) -> FeatureTap:
        self.features = None
        self._handle = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


def forward_with_features(
    network: torch.nn.Module, inputs: torch.Tensor, layer: str = "encoder", inferer=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(network(inputs), features of `layer`)`` in one forward pass; ``inferer(inputs, network)`` if given."""
    with FeatureTap(network, layer) as tap:
        logits = network(inputs) if inferer is None else inferer(inputs, network)
    if tap.features is None:
        raise RuntimeError(f"layer {tap.layer!r} did not run in the forward pass")
    return logits, tap.features


def add_dropout(
    network: torch.nn.Module,
    p: float,
    layers: Sequence[str] = REFERENCE_DROPOUT_LAYERS,
    kind: str = "channel",
    always: bool = False,
) -> list[torch.utils.hooks.RemovableHandle]:
    """Dropout with probability ``p`` on the outputs of ``layers``, through forward hooks, as the references'
    backbones have it (:data:`REFERENCE_DROPOUT_LAYERS`, :data:`DROPOUT_KINDS`).

    A hook adds no parameter: ``state_dict()`` keys and values are those of the network without dropout, so its
    checkpoints load into the dropout-free ``network_def`` that inference, MONAI Label and TorchScript export
    build. The dropout is active when the module is in training mode, or always with ``always`` (a teacher that
    runs in training mode, as the references' EMA teachers do, or MC-dropout passes). Returns the hooks' handles
    (``handle.remove()`` takes the dropout off again).
    """
    if not 0.0 <= float(p) < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    if kind not in DROPOUT_KINDS:
        raise ValueError(f"dropout kind {kind!r}: choose from {sorted(DROPOUT_KINDS)}")
    drop, modules = DROPOUT_KINDS[kind], dict(unwrap(network).named_modules())
    handles = []
    for layer in layers:
        name = FEATURE_LAYERS.get(layer, layer)
        if name not in modules or name == "":
            for handle in handles:
                handle.remove()
            raise ValueError(f"dropout layer {layer!r} is not in {type(unwrap(network)).__name__}")

        def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            return drop(output, float(p), training=always or module.training)

        handles.append(modules[name].register_forward_hook(hook))
    return handles
