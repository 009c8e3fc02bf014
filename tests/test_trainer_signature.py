# Copyright (c) 2026 The CPCL bundle authors
# SPDX-License-Identifier: Apache-2.0
"""CPCLTrainer takes SupervisedTrainer's arguments from SupervisedTrainer's own signature (names, order, defaults;
positionally or by name), then its semi-supervised ones by name; what its iteration cannot honour is refused."""

import inspect

import pytest
import torch
from ignite.engine import Events
from monai.engines import SupervisedTrainer
from monai.inferers import SimpleInferer
from torch.utils.data import DataLoader

from cpcl_bundle.trainer import CPCLTrainer
from cpcl_tools import train_objects
from tests.helpers import TINY_FEATURES, blob_batch

SUPERVISED = inspect.signature(SupervisedTrainer).parameters


def _required() -> dict:
    net = train_objects.network_def(features=TINY_FEATURES)
    return {
        "device": "cpu",
        "max_epochs": 1,
        "train_data_loader": DataLoader(blob_batch(2, seed=1), batch_size=1),
        "network": net,
        "optimizer": train_objects.optimizer(net),
        "loss_function": train_objects.loss(),
    }


class Counter:
    """A train handler recording the iterations it saw."""

    def __init__(self) -> None:
        self.iterations: list[int] = []

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: self.iterations.append(e.state.iteration))


def test_signature_is_supervised_trainers_then_keyword_only():
    params = list(inspect.signature(CPCLTrainer).parameters.values())
    assert [(p.name, p.kind, p.default) for p in params[: len(SUPERVISED)]] == [
        (p.name, p.kind, p.default) for p in SUPERVISED.values()
    ]
    assert {"compile", "compile_kwargs", "accumulation_steps"} <= set(SUPERVISED)  # MONAI 1.5+ arguments included
    own = params[len(SUPERVISED) :]
    assert own[0].name == "unlabeled_data_loader" and own[-1].kind is inspect.Parameter.VAR_KEYWORD
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in own[:-1])
    assert not {p.name for p in own} & set(SUPERVISED)


@pytest.mark.parametrize("positional", [True, False], ids=["positionally", "by_name"])
def test_every_supervised_argument_reaches_supervised_trainer(positional):
    """Every SupervisedTrainer argument, in its order, with some set away from their defaults."""
    values = {**{name: p.default for name, p in SUPERVISED.items()}, **_required()}
    handler, inferer = Counter(), SimpleInferer()
    values.update(
        epoch_length=1,
        inferer=inferer,
        train_handlers=[handler],
        optim_set_to_none=True,
        non_blocking=True,
        to_kwargs={"dtype": torch.float32},
        decollate=False,
        compile_kwargs={"mode": "unused while compile is off"},
    )
    assert list(values) == list(SUPERVISED)
    if positional:
        trainer = CPCLTrainer(*values.values(), method="supervised", max_nonfinite_steps=2)
    else:
        trainer = CPCLTrainer(**values, method="supervised", max_nonfinite_steps=2)
    assert trainer.network is values["network"] and trainer.optimizer is values["optimizer"]
    assert trainer.loss_function is values["loss_function"] and trainer.inferer is inferer
    assert trainer.state.epoch_length == 1 and trainer.optim_set_to_none and trainer.non_blocking
    assert trainer.to_kwargs == {"dtype": torch.float32} and trainer.accumulation_steps == 1 and not trainer.compile
    assert trainer.guard.max_steps == 2  # and the keyword-only ones reach CPCLTrainer
    trainer.run()
    assert handler.iterations == [1]  # the handler given as SupervisedTrainer's train_handlers ran
    assert set(trainer.state.output) >= {"image", "label", "pred", "loss"}


def test_too_many_positional_arguments_fail_as_in_supervised_trainer():
    values = list(_required().values()) + [p.default for p in list(SUPERVISED.values())[6:]]
    with pytest.raises(TypeError, match="too many positional arguments"):
        CPCLTrainer(*values, None, method="supervised")
    with pytest.raises(TypeError, match="missing a required argument: 'loss_function'"):
        CPCLTrainer(*values[:5], method="supervised")


def test_compile_is_refused_with_the_reason():
    with pytest.raises(ValueError, match=r"compile=True.*hooks"):
        CPCLTrainer(**_required(), compile=True, method="supervised")


@pytest.mark.parametrize("steps", [2, 4])
def test_gradient_accumulation_is_refused_with_the_reason(steps):
    with pytest.raises(ValueError, match=rf"accumulation_steps={steps}: the teacher's EMA update"):
        CPCLTrainer(**_required(), accumulation_steps=steps, method="supervised")
    with pytest.raises(ValueError, match="must be a positive integer"):  # SupervisedTrainer's own check
        CPCLTrainer(**_required(), accumulation_steps=0, method="supervised")
