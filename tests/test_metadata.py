# Copyright (c) 2026 The CPCL bundle authors
# SPDX-License-Identifier: Apache-2.0
"""cpcl_tools.metadata: the metadata's description of the output channels follows the configs' classes."""

import json
from pathlib import Path

import pytest

from cpcl_tools.metadata import CLASS_CONFIGS, classes_of, describe_classes, described_classes, with_classes

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
META = json.loads((CONFIGS / "metadata.json").read_text())


def test_the_shipped_metadata_describes_the_shipped_classes():
    assert described_classes(META) == classes_of(CONFIGS / "inference.json") == classes_of(CONFIGS / "train.json")
    assert describe_classes(META, ["background", "kidney"]) == META  # nothing to rewrite


def test_other_classes_rewrite_only_the_channel_description():
    four = ["background", "necrotic_core", "edema", "enhancing_tumour"]
    out = describe_classes(META, four)
    assert described_classes(out) == four and out["network_data_format"]["outputs"]["pred"]["num_channels"] == 4
    assert out["pred_classes"] == "4 channels: 0 background, 1 necrotic_core, 2 edema, 3 enhancing_tumour"
    changed = {k for k in META if out[k] != META[k]}
    assert changed == {"network_data_format", "label_classes", "pred_classes"}
    assert out["network_data_format"]["inputs"] == META["network_data_format"]["inputs"]
    assert described_classes(META) == ["background", "kidney"]  # the input is not modified


@pytest.mark.parametrize("classes", [["kidney", "background"], ["background"]])
def test_classes_must_start_with_background_and_name_a_foreground(classes):
    with pytest.raises(ValueError, match="must start with 'background'"):
        describe_classes(META, classes)


def test_a_config_without_literal_classes_is_refused(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"classes": "$@other"}))
    with pytest.raises(ValueError, match="'classes' must be a list"):
        classes_of(path)


def test_with_classes_sets_the_configs_and_describes_the_metadata():
    """A bundle's files for a model with other classes: the configs that carry ``classes`` get the new list, the
    metadata describes it, every other file (and a config without ``classes``) is returned unchanged."""
    three = ["background", "kidney", "tumour"]
    for rel in CLASS_CONFIGS:
        config = json.loads((CONFIGS / Path(rel).name).read_text())
        out = with_classes(rel, config, three)
        assert out["classes"] == three and {k: v for k, v in out.items() if k != "classes"} == {
            k: v for k, v in config.items() if k != "classes"
        }
        assert config["classes"] == ["background", "kidney"]  # the input is not modified
    assert described_classes(with_classes("configs/metadata.json", META, three)) == three
    evaluate = json.loads((CONFIGS / "evaluate.json").read_text())
    assert with_classes("configs/evaluate.json", evaluate, three) is evaluate
    assert with_classes("configs/train.json", {"max_iterations": 2}, three) == {"max_iterations": 2}
    with pytest.raises(ValueError, match="background"):
        with_classes("configs/metadata.json", META, ["kidney", "tumour"])
