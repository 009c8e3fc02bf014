# Copyright (c) 2026 The CPCL bundle authors
# SPDX-License-Identifier: Apache-2.0
"""Fig. 6 maps: taken from the trainer's step on the shown iterations, written to TensorBoard and as PNG montages."""

import numpy as np
import pytest
import torch
from ignite.engine import Events
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader

from cpcl_bundle import handlers as handlers_module
from cpcl_bundle.handlers import PANELS, PrototypeMapHandler, map_panels, pick_slice, probe_maps
from cpcl_bundle.trainer import CPCLTrainer
from cpcl_tools import train_objects
from tests.helpers import blob_batch


def cpcl_trainer(net, max_epochs: int = 1, **kwargs) -> CPCLTrainer:
    """CPCL on one batch of two labeled and one of two unlabeled blob volumes (one step an epoch)."""
    return CPCLTrainer(
        "cpu",
        max_epochs,
        DataLoader(blob_batch(2, seed=1), batch_size=2),
        net,
        train_objects.optimizer(net),
        train_objects.loss(),
        unlabeled_data_loader=DataLoader(blob_batch(2, seed=2, with_label=False), batch_size=2),
        method="cpcl",
        **kwargs,
    )


def test_pick_slice_finds_the_foreground():
    vol = torch.zeros(4, 5, 6)
    vol[:, :, 4] = 1
    assert pick_slice(vol) == 4 and pick_slice(torch.zeros(4, 5, 6)) == 3


def test_maps_reach_tensorboard_and_png_only_every_interval(tiny_net, tmp_path, monkeypatch):
    handler = PrototypeMapHandler(log_dir=str(tmp_path / "tb"), interval=2, png_dir=tmp_path / "png")
    trainer = cpcl_trainer(tiny_net, 3, train_handlers=[handler])
    recorded = []
    orig = handlers_module.step_maps

    def spy(*args):
        recorded.append(trainer.state.iteration)
        return orig(*args)

    monkeypatch.setattr(handlers_module, "step_maps", spy)
    trainer.run()
    assert set(recorded) == {2}  # only the requested step pays for the maps
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0}).Reload()
    tags = set(acc.Tags()["images"])
    assert {f"prototype_maps/{p}" for p in ("x_u", "p_u", "x_l", "y_l", "p_l")} <= tags
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == [
        "prototype_maps_000002.npz",
        "prototype_maps_000002.png",
    ]


def test_fixed_probe_follows_one_slice_through_training(tiny_net, tmp_path):
    """Fig. 6 shows one slice at several points of training: the same volumes and cut at every snapshot while
    the batches change, with maps of the current weights (the probe itself changes nothing)."""
    from cpcl_bundle.handlers import load_snapshots

    labeled = DataLoader(blob_batch(4, seed=1), batch_size=2)  # two different batches alternate
    unlabeled = DataLoader(blob_batch(4, seed=2, with_label=False), batch_size=2)
    handler = PrototypeMapHandler(log_dir=str(tmp_path / "tb"), interval=1, png_dir=tmp_path / "png")
    trainer = CPCLTrainer(
        "cpu",
        2,
        labeled,
        tiny_net,
        train_objects.optimizer(tiny_net),
        train_objects.loss(),
        unlabeled_data_loader=unlabeled,
        method="cpcl",
        train_handlers=[handler],
    )
    trainer.run()
    snapshots = load_snapshots(tmp_path / "png")
    assert sorted(snapshots) == [1, 2, 3, 4]
    first = snapshots[1]
    assert set(first) == set(PANELS)
    for later in (snapshots[2], snapshots[3], snapshots[4]):
        for key in ("x_l", "y_l", "x_u"):
            assert (later[key] == first[key]).all(), key
    assert not (snapshots[4]["p_l"] == first["p_l"]).all()  # the weights moved on
    # probing is side-effect free: same weights in, same maps out, weights unchanged
    before = {k: v.clone() for k, v in tiny_net.state_dict().items()}
    x_l, y_l, x_u = (torch.from_numpy(first[k])[None, :, :, None].repeat(1, 1, 1, 16) for k in ("x_l", "y_l", "x_u"))
    a, b = probe_maps(trainer, x_l, y_l, x_u), probe_maps(trainer, x_l, y_l, x_u)
    assert all(torch.equal(a[k], b[k]) for k in a if a[k] is not None)
    assert all(torch.equal(v, tiny_net.state_dict()[k]) for k, v in before.items())


def test_map_panels_are_unit_range_slices():
    maps = {
        "x_l": torch.randn(1, 8, 8, 4) * 100,
        "y_l": torch.zeros(1, 8, 8, 4),
        "p_l": torch.rand(2, 8, 8, 4),
        "x_u": torch.randn(1, 8, 8, 4),
        "p_u": torch.rand(2, 8, 8, 4),
        "p_l2u": torch.rand(2, 8, 8, 4),
        "p_u2l": None,
    }
    panels = map_panels(maps)
    assert set(panels) == set(PANELS) - {"p_u2l"}
    assert all(p.shape == (8, 8) and p.min() >= 0 and p.max() <= 1 for p in panels.values())


def test_every_foreground_class_gets_its_panels_and_montage_rows(tmp_path):
    """Three classes: class 1 keeps the plain panel names, class 2's panels are suffixed and show class 2 (its
    label mask is y_l == 2, its maps channel 2); the montage has two rows per foreground class."""
    from cpcl_bundle.handlers import class_panels, slice_cuts

    g = torch.Generator().manual_seed(0)
    y_l = torch.zeros(1, 12, 12, 8)
    y_l[:, 2:6, 2:6, 2:6], y_l[:, 7:10, 7:10, 2:6] = 1, 2
    probs = lambda: torch.softmax(torch.randn(3, 12, 12, 8, generator=g), 0)  # noqa: E731
    maps = {"x_l": torch.rand(1, 12, 12, 8, generator=g), "y_l": y_l, "p_l": probs(), "x_u": torch.rand(1, 12, 12, 8)}
    maps.update(p_u=probs(), p_l2u=probs(), p_u2l=probs())
    panels = class_panels(maps)
    assert set(panels) == set(PANELS) | {f"{n}_class2" for n in PANELS}
    cut = slice_cuts(maps)["l"]  # the labeled stream: where the label has the most foreground
    assert 2 <= cut <= 5
    assert np.array_equal(panels["y_l_class2"], (y_l[0, :, :, cut] == 2).float().numpy())
    assert np.array_equal(panels["y_l"], (y_l[0, :, :, cut] == 1).float().numpy())
    assert np.allclose(panels["p_l_class2"], maps["p_l"][2, :, :, cut].numpy())
    handler = PrototypeMapHandler(png_dir=tmp_path)
    handler._save_png(panels, 7)
    from PIL import Image

    montage = np.asarray(Image.open(tmp_path / "prototype_maps_000007.png"))
    assert montage.shape == (4 * 12, 4 * 12)  # 2 classes x 2 rows of 4 panels of 12 x 12 (a binary model: 2 rows)


def test_probe_with_backbone_dropout_is_repeatable_and_moves_no_random_stream(tiny_net):
    """With the references' dropout on (student in training mode, teacher always), two probes of the same weights
    give the same maps and leave the global random state where it was, so probing cannot shift training."""
    trainer = cpcl_trainer(tiny_net, dropout=0.5)
    tiny_net.train()
    x_l, y_l, x_u = (
        blob_batch(1, seed=3)[0]["image"],
        blob_batch(1, seed=3)[0]["label"],
        blob_batch(1, seed=4)[0]["image"],
    )
    state = torch.get_rng_state()
    a, b = probe_maps(trainer, x_l, y_l, x_u), probe_maps(trainer, x_l, y_l, x_u)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(a[k], b[k]) for k in a if a[k] is not None)


@pytest.mark.parametrize("injected", [False, True])
def test_the_writer_it_opened_is_closed_at_the_end_an_injected_one_is_not(tiny_net, tmp_path, injected):
    from torch.utils.tensorboard import SummaryWriter

    given = SummaryWriter(log_dir=str(tmp_path / "given")) if injected else None
    handler = PrototypeMapHandler(log_dir=str(tmp_path / "tb"), interval=1, summary_writer=given)
    trainer = cpcl_trainer(tiny_net, train_handlers=[handler])
    used = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda _: used.append(handler.writer))
    trainer.run()
    writer = used[-1]
    if injected:
        assert writer is given and given.file_writer is not None  # its owner closes it
        given.close()
    else:
        assert writer.file_writer is None  # closed at COMPLETED
