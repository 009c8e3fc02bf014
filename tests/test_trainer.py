# Copyright (c) 2026 The CPCL bundle authors
# SPDX-License-Identifier: Apache-2.0
"""CPCLTrainer on tiny tensors: the step of every method, Eq. 2 for the teacher, Eq. 11 for the objective."""

import math

import pytest
import torch
import torch.multiprocessing as mp
from ignite.engine import Events
from monai.engines import IterationEvents
from torch.utils.data import DataLoader

from cpcl_bundle.trainer import TERM_KEYS, CPCLTrainer, loss_terms
from cpcl_tools import train_objects
from tests.helpers import blob_batch


def make_trainer(net, method, max_epochs=1, n_labeled=2, lr=0.01, loss_function=None, handlers=None, **kwargs):
    labeled = DataLoader(blob_batch(n_labeled, seed=1), batch_size=2)
    unlabeled = DataLoader(blob_batch(4, seed=2, with_label=False), batch_size=2, shuffle=False)
    optimizer = train_objects.optimizer(net, learning_rate=lr)
    handlers = handlers or []
    return CPCLTrainer(
        device="cpu",  # a plain string, as MONAI Label passes it
        max_epochs=max_epochs,
        train_data_loader=labeled,
        network=net,
        optimizer=optimizer,
        loss_function=loss_function or train_objects.loss(),
        train_handlers=handlers,
        unlabeled_data_loader=unlabeled,
        method=method,
        **kwargs,
    )


def record_terms(trainer):
    history = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: history.append(loss_terms(e.state.output)))
    return history


@pytest.mark.parametrize("method", ["cpcl", "mt", "supervised", "mt_cpcl"])
def test_training_decreases_the_loss_without_nan(tiny_net, method):
    trainer = make_trainer(tiny_net, method, max_epochs=12, lr=0.05, rampup="constant")
    history = record_terms(trainer)
    trainer.run()
    assert len(history) == 12
    assert all(math.isfinite(v) for h in history for v in h.values())
    assert history[-1]["loss"] < history[0]["loss"]
    assert history[-1]["loss_sup"] < history[0]["loss_sup"]
    prototype_terms = trainer.method.terms & {"fpc", "bpc"}
    terms = {f"loss_{t}" for t in trainer.method.terms} | {f"skipped_{t}" for t in prototype_terms}
    terms |= {f"skipped_{t}_class{k}" for t in prototype_terms for k in range(2)}  # per class, K = 2
    assert set(TERM_KEYS) | terms == set(history[-1])  # logged keys derive from the method's terms
    if method in ("cpcl", "mt_cpcl"):
        assert any(h["loss_bpc"] > 0 for h in history) and any(h["loss_fpc"] > 0 for h in history)
    if "mt" in method:
        assert all(h["loss_mt"] > 0 for h in history)


def test_teacher_follows_eq2_and_departs_from_student(tiny_net):
    trainer = make_trainer(tiny_net, "cpcl", max_epochs=3)
    teacher, before = trainer.teacher, {}

    @trainer.on(Events.ITERATION_STARTED)
    def keep(_):
        before["teacher"] = [p.detach().clone() for p in teacher.parameters()]

    errors = []

    @trainer.on(Events.ITERATION_COMPLETED)
    def check(_):
        for old, new, student in zip(before["teacher"], teacher.parameters(), tiny_net.parameters()):
            errors.append((new - (0.99 * old + 0.01 * student.detach())).abs().max().item())

    trainer.run()
    assert max(errors) < 1e-6
    diff = sum((t - s).abs().sum().item() for t, s in zip(teacher.parameters(), tiny_net.parameters()))
    assert diff > 0
    assert all(not p.requires_grad for p in teacher.parameters())


def _batch_sizes(module):
    sizes = []
    module.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]))
    return sizes


def test_cpcl_student_sees_only_labeled_images_and_mt_student_sees_both(tiny_net):
    trainer = make_trainer(tiny_net, "cpcl", max_epochs=2)
    student, teacher = _batch_sizes(tiny_net), _batch_sizes(trainer.teacher)
    trainer.run()
    assert student == [2, 2] and teacher == [2, 2]
    trainer = make_trainer(tiny_net, "mt", max_epochs=2)
    student = _batch_sizes(tiny_net)
    trainer.run()
    assert student == [4, 4]


def test_supervised_needs_no_teacher_and_no_unlabeled_data(tiny_net):
    class Exploding:
        def __iter__(self):
            raise AssertionError("the unlabeled stream must not be read")

    labeled = DataLoader(blob_batch(2), batch_size=2)
    trainer = CPCLTrainer(
        "cpu",
        2,
        labeled,
        tiny_net,
        train_objects.optimizer(tiny_net),
        train_objects.loss(),
        unlabeled_data_loader=Exploding(),
        method="supervised",
    )
    history = record_terms(trainer)
    trainer.run()
    assert trainer.teacher is None and len(history) == 2 and history[0]["lambda"] == 0.0


def test_lambda_follows_gaussian_rampup_over_the_run(tiny_net):
    trainer = make_trainer(tiny_net, "cpcl", max_epochs=5, w_max=0.1)
    history = record_terms(trainer)
    trainer.run()
    expected = [0.1 * math.exp(-5 * (1 - t / 5) ** 2) for t in range(5)]
    assert [h["lambda"] for h in history] == pytest.approx(expected)


def test_poly_lr_per_step(tiny_net):
    optimizer_holder = {}
    net = tiny_net
    labeled = DataLoader(blob_batch(2), batch_size=2)
    opt = train_objects.optimizer(net)
    optimizer_holder["opt"] = opt
    trainer = CPCLTrainer(
        "cpu",
        4,
        labeled,
        net,
        opt,
        train_objects.loss(),
        method="supervised",
        train_handlers=[train_objects.lr_handler(opt, max_iterations=10)],
    )
    trainer.run()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01 * (1 - 4 / 10) ** 0.9)
    assert opt.param_groups[0]["momentum"] == 0.9 and opt.param_groups[0]["weight_decay"] == 1e-4


@pytest.mark.parametrize("prototype_grad", [True, False])
def test_prototype_terms_train_the_encoder_only_with_prototype_grad(tiny_net, prototype_grad):
    """Through the trainer: with L_s switched off, CPCL's gradient comes from L_fpc + beta L_bpc alone."""
    zero_loss = lambda pred, target: pred.sum() * 0.0  # noqa: E731
    trainer = make_trainer(tiny_net, "cpcl", loss_function=zero_loss, rampup="constant", prototype_grad=prototype_grad)
    grads = {}

    @trainer.on(IterationEvents.BACKWARD_COMPLETED)
    def grab(engine):
        grads["encoder"] = sum(
            p.grad.abs().sum().item() for n, p in tiny_net.named_parameters() if n.startswith("down_")
        )
        grads["terms"] = engine.state.output["loss_fpc"], engine.state.output["loss_bpc"]

    trainer.run()
    assert grads["terms"][0] > 0 and grads["terms"][1] > 0
    assert (grads["encoder"] > 0) == prototype_grad


def test_missing_unlabeled_loader_is_an_error(tiny_net):
    labeled = DataLoader(blob_batch(2), batch_size=2)
    with pytest.raises(ValueError, match="needs unlabeled data"):
        CPCLTrainer("cpu", 1, labeled, tiny_net, train_objects.optimizer(tiny_net), train_objects.loss())


@pytest.mark.parametrize("max_iterations,epochs_completed", [(3, 1), (4, 2)])
def test_max_iterations_stops_the_run_after_the_epochs_handlers(tiny_net, max_iterations, epochs_completed):
    trainer = make_trainer(
        tiny_net, "supervised", max_epochs=5, n_labeled=2, max_iterations=max_iterations, epoch_length=2
    )
    completed = []
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: completed.append(e.state.epoch))
    trainer.run()
    assert trainer.state.iteration == max_iterations and len(completed) == epochs_completed
    assert trainer.total_iterations == max_iterations


def test_non_finite_steps_never_touch_the_weights_and_stop_the_run(tiny_net):
    calls = {"n": 0}

    def flaky_loss(pred, target):
        calls["n"] += 1
        loss = train_objects.loss()(pred, target)
        return loss * float("nan") if calls["n"] >= 2 else loss  # finite once, then NaN forever

    trainer = make_trainer(tiny_net, "cpcl", max_epochs=10, loss_function=flaky_loss, max_nonfinite_steps=3)
    after_first = {}

    @trainer.on(Events.ITERATION_COMPLETED(once=1))
    def keep(_):
        after_first.update({k: v.clone() for k, v in tiny_net.state_dict().items()})

    with pytest.raises(RuntimeError, match="3 steps in a row had a non-finite loss"):
        trainer.run()
    assert trainer.state.iteration == 4  # 1 finite step, then 3 skipped ones
    assert all(torch.equal(after_first[k], v) for k, v in tiny_net.state_dict().items())
    assert all(torch.isfinite(p).all() for p in trainer.teacher.parameters())


def test_time_limit_ends_the_run_gracefully_counting_from_its_start(tiny_net, tmp_path, monkeypatch):
    """The bundle's ``time_limit``: Ignite's TimeLimit timed from the run's start (not from when the handler was
    made), ending it as at its last step: COMPLETED fires, so the final checkpoint is written. A clock that moves
    only where the test says (each step takes 4 s of it), so a slow or busy machine gives the same result."""
    import types

    import ignite.handlers.time_limit as ignite_time_limit

    from cpcl_bundle import trainer as trainer_module
    from cpcl_bundle.resume import ResumeCheckpoint, latest_checkpoint
    from cpcl_bundle.trainer import TimeLimit

    clock = types.SimpleNamespace(now=1000.0)
    fake_time = types.SimpleNamespace(time=lambda: clock.now)
    monkeypatch.setattr(trainer_module, "time", fake_time)
    monkeypatch.setattr(ignite_time_limit, "time", fake_time)
    limit = TimeLimit(limit_sec=10)
    clock.now += 60  # made long before the run starts (e.g. while the data is cached): not counted
    trainer = make_trainer(tiny_net, "supervised", max_epochs=50, handlers=[limit, ResumeCheckpoint(tmp_path, 1000)])

    @trainer.on(Events.ITERATION_COMPLETED)
    def step_takes_four_seconds(_):
        clock.now += 4.0

    completed = []
    trainer.add_event_handler(Events.COMPLETED, lambda e: completed.append(e.state.iteration))
    trainer.run()
    # the limit, attached first, reads the clock before the step's 4 s are added: 12 s > 10 s at the fourth step
    assert trainer.state.iteration == 4 and completed == [4]
    assert latest_checkpoint(tmp_path).name == "resume_checkpoint_4.pt"


def _time_limit_rank(rank: int, port: int, seconds_per_step: list[float], stops: "mp.Queue") -> None:
    """One rank of a 2-process gloo group: an engine of 20 empty iterations with the bundle's TimeLimit (10 s),
    whose clock advances ``seconds_per_step[rank]`` per iteration; the iteration it stopped at goes to ``stops``."""
    import types

    import torch.distributed as dist
    from ignite.engine import Engine

    from cpcl_bundle import trainer as trainer_module

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        clock = types.SimpleNamespace(now=0.0)
        trainer_module.time = types.SimpleNamespace(time=lambda: clock.now)
        engine = Engine(lambda e, b: None)
        trainer_module.TimeLimit(limit_sec=10).attach(engine)
        engine.add_event_handler(
            Events.ITERATION_COMPLETED, lambda e: setattr(clock, "now", clock.now + seconds_per_step[rank])
        )
        engine.run(range(20), max_epochs=1)
        stops.put((rank, engine.state.iteration))
    finally:
        dist.destroy_process_group()


def test_time_limit_stops_every_rank_at_the_same_iteration():
    """Under torchrun the ranks' clocks differ: rank 0's limit passes at its 4th step (12 s > 10 s), rank 1's never
    (its clock stands still). Both stop at iteration 4; a rank-local limit would stop rank 0 alone (and under DDP leave
    rank 1 waiting in the gradient all-reduce)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    stops = ctx.Queue()
    procs = [ctx.Process(target=_time_limit_rank, args=(r, port, [4.0, 0.0], stops)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        results = dict(stops.get(timeout=180) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    assert results == {0: 4, 1: 4}


def test_ema_warmup_makes_the_first_teacher_the_student_then_their_running_mean(tiny_net):
    trainer = make_trainer(tiny_net, "mt", max_epochs=3, ema_warmup=True)
    teacher, before, errors = trainer.teacher, {}, []

    @trainer.on(Events.ITERATION_STARTED)
    def keep(_):
        before["teacher"] = [p.detach().clone() for p in teacher.parameters()]

    @trainer.on(Events.ITERATION_COMPLETED)
    def check(engine):
        alpha = 1 - 1 / engine.state.iteration  # 0, 1/2, 2/3: the update_ema_variables warm-up
        for old, new, student in zip(before["teacher"], teacher.parameters(), tiny_net.parameters()):
            errors.append((new - (alpha * old + (1 - alpha) * student.detach())).abs().max().item())

    trainer.run()
    assert len(errors) == 3 * len(list(tiny_net.parameters())) and max(errors) < 1e-6


@pytest.mark.parametrize("kind, expected", [("poly", lambda t: 0.01 * (1 - t / 10) ** 0.9), ("step", None)])
def test_lr_schedules_stepped_per_iteration(tiny_net, kind, expected):
    """``lr_scheduler``: the paper's poly decay over the run, or UA-MT's and DTML's x0.1 every ``step_size`` steps."""
    from cpcl_bundle.trainer import lr_scheduler

    optimizer = train_objects.optimizer(tiny_net)
    scheduler = lr_scheduler(optimizer, kind, total_steps=10, step_size=4, gamma=0.1)
    lrs = []
    for _ in range(10):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    literal = [expected(t) if expected else 0.01 * 0.1 ** (t // 4) for t in range(10)]
    assert lrs == pytest.approx(literal)
    with pytest.raises(ValueError, match="expected 'poly' or 'step'"):
        lr_scheduler(optimizer, "cosine")


def test_backbone_dropout_on_student_in_training_and_on_the_teacher_always(tiny_net):
    trainer = make_trainer(tiny_net, "uamt", max_epochs=1, dropout=0.5)
    x = torch.randn(1, 1, 32, 32, 32)
    tiny_net.train()
    assert not torch.equal(tiny_net(x), tiny_net(x))
    tiny_net.eval()
    assert torch.equal(tiny_net(x), tiny_net(x))  # validation and inference see the plain network
    with torch.no_grad():
        assert not torch.equal(trainer.teacher(x), trainer.teacher(x))  # the references' teacher in training mode
    assert trainer.terms[0].dropout == 0.0  # UA-MT's passes are stochastic through the teacher's own dropout
    trainer.run()
    assert all(torch.isfinite(p).all() for p in tiny_net.parameters())
