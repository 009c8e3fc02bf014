# Copyright (c) 2026 The CPCL bundle authors
# SPDX-License-Identifier: Apache-2.0
"""Datalists, the seeded labeled/unlabeled split, and the cycling unlabeled stream."""

import json

import pytest
from torch.utils.data import DataLoader, DistributedSampler

from cpcl_bundle.data import CyclingLoader, load_datalist, semi_supervised_split


def _write(tmp_path, content):
    path = tmp_path / "dataset.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def test_load_datalist_resolves_paths_and_fills_keys(tmp_path):
    path = _write(
        tmp_path, {"training": [{"image": "img/a.nii.gz", "label": "lab/a.nii.gz"}], "test": ["img/t.nii.gz"]}
    )
    dl = load_datalist(path)
    assert dl["training"][0]["image"] == str(tmp_path / "img/a.nii.gz")
    assert dl["test"] == [{"image": str(tmp_path / "img/t.nii.gz")}]
    assert dl["validation"] == [] and dl["unlabeled"] == []


@pytest.mark.parametrize(
    "content,match",
    [
        ("{not json", "not valid JSON"),
        ({"validation": []}, "no 'training' list"),
        ({"training": [{"image": "a"}]}, "has no 'label'"),
        ({"training": [], "test": [{"label": "x"}]}, "has no 'image'"),
    ],
)
def test_bad_datalists_name_file_and_cause(tmp_path, content, match):
    path = _write(tmp_path, content)
    with pytest.raises(ValueError, match=match) as e:
        load_datalist(path)
    assert str(path) in str(e.value)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_datalist(tmp_path / "missing.json")


def _datalist(n=20):
    return {"training": [{"image": f"i{k}", "label": f"l{k}"} for k in range(n)], "unlabeled": [{"image": "extra"}]}


def test_split_is_seeded_disjoint_and_written(tmp_path):
    a = semi_supervised_split(_datalist(), labeled_ratio=0.1, seed=3, output_dir=tmp_path)
    b = semi_supervised_split(_datalist(), labeled_ratio=0.1, seed=3)
    c = semi_supervised_split(_datalist(), labeled_ratio=0.1, seed=4)
    assert a == b and a != c
    assert len(a["labeled"]) == 2 and len(a["unlabeled"]) == 19  # 18 without labels + the extra one
    labeled = {d["image"] for d in a["labeled"]}
    assert labeled.isdisjoint(d["image"] for d in a["unlabeled"])
    assert all("label" not in d for d in a["unlabeled"])
    written = json.loads((tmp_path / "split.json").read_text())
    assert written["labeled"] == a["labeled"] and written["seed"] == 3


def test_num_labeled_and_full_supervision():
    assert len(semi_supervised_split(_datalist(), num_labeled=5)["labeled"]) == 5
    full = semi_supervised_split(_datalist())
    assert len(full["labeled"]) == 20 and full["unlabeled"] == [{"image": "extra"}]
    with pytest.raises(ValueError, match="labeled_ratio"):
        semi_supervised_split(_datalist(), labeled_ratio=0)
    with pytest.raises(ValueError, match="num_labeled"):
        semi_supervised_split(_datalist(), num_labeled=21)


def test_cycling_loader_restarts_and_sets_epoch():
    sampler = DistributedSampler(list(range(4)), num_replicas=1, rank=0, shuffle=True, seed=0)
    stream = CyclingLoader(DataLoader(list(range(4)), batch_size=2, sampler=sampler))
    seen = [next(stream).tolist() for _ in range(6)]
    assert stream.epoch == 2
    assert sorted(sum(seen[:2], [])) == sorted(sum(seen[2:4], [])) == [0, 1, 2, 3]
    assert seen[:2] != seen[2:4]  # reshuffled per pass through set_epoch
    with pytest.raises(RuntimeError, match="unlabeled set empty"):
        next(CyclingLoader(DataLoader([], batch_size=2)))


def test_ensure_dataset_generates_once_and_never_writes_into_user_folders(tmp_path):
    from cpcl_bundle.data import ensure_dataset

    small = {"num_training": 2, "num_validation": 1, "num_test": 1, "workers": 1, "scale": 0.3}
    target = tmp_path / "new"
    path = ensure_dataset(target, **small)
    assert path == target / "dataset.json" and len(load_datalist(path)["training"]) == 2
    stamp = path.stat().st_mtime_ns
    assert ensure_dataset(target, **small).stat().st_mtime_ns == stamp  # used as is the second time
    # an interrupted generation (no dataset.json yet, only the generator's folders) is completed
    interrupted = tmp_path / "interrupted"
    (interrupted / "imagesTr").mkdir(parents=True)
    (interrupted / "imagesTr" / "case_0000.nii.gz").write_bytes(b"truncated")
    assert ensure_dataset(interrupted, **small).is_file()
    # a user's folder without a datalist is an error, and nothing is written into it
    user = tmp_path / "user"
    user.mkdir()
    (user / "scan.nii.gz").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="no dataset.json"):
        ensure_dataset(user, **small)
    assert sorted(p.name for p in user.iterdir()) == ["scan.nii.gz"]


def test_unlabeled_stream_under_monai_label_is_the_datastores_unlabeled_images(tmp_path):
    from cpcl_bundle.data import unlabeled_data

    studies = tmp_path / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    for name in ("a", "b", "c"):
        (studies / f"{name}.nii.gz").write_bytes(b"x")
    (studies / "labels" / "final" / "a.nii.gz").write_bytes(b"x")
    (studies / "datastore_v2.json").write_text("{}")
    labeled = [{"image": str(studies / "a.nii.gz"), "label": str(studies / "labels" / "final" / "a.nii.gz")}]
    never = tmp_path / "bundle_data"  # the bundle's own dataset_dir: must not be generated into
    got = unlabeled_data(labeled, never, labeled_ratio=0.1)
    assert got == [{"image": str(studies / "b.nii.gz")}, {"image": str(studies / "c.nii.gz")}]
    assert not never.exists()


def test_labeled_and_unlabeled_data_share_one_split(tmp_path):
    from cpcl_bundle.data import labeled_data, unlabeled_data
    from cpcl_bundle.synthetic import generate_dataset

    generate_dataset(tmp_path / "d", num_training=5, num_validation=1, num_test=1, workers=1, scale=0.3)
    labeled = labeled_data(tmp_path / "d", 0.4, None, 0, tmp_path / "out")
    unlabeled = unlabeled_data(labeled, tmp_path / "d", 0.4, None, 0, tmp_path / "out")
    assert len(labeled) == 2 and len(unlabeled) == 3
    assert {d["image"] for d in labeled}.isdisjoint(d["image"] for d in unlabeled)
    assert json.loads((tmp_path / "out" / "split.json").read_text())["labeled"] == labeled


def test_labeled_data_splits_a_prepared_datalist(tmp_path):
    """The configs prepare the data set once (``datalist_file``) and pass its datalist: the same split as from the
    folder, and nothing is generated (the folder argument is not needed)."""
    from cpcl_bundle.data import ensure_dataset, labeled_data, unlabeled_data
    from cpcl_bundle.synthetic import generate_dataset

    generate_dataset(tmp_path / "d", num_training=5, num_validation=1, num_test=1, workers=1, scale=0.3)
    datalist = ensure_dataset(tmp_path / "d", generate=False)
    labeled = labeled_data(datalist=datalist, labeled_ratio=0.4, seed=0, output_dir=tmp_path / "out")
    assert labeled == labeled_data(tmp_path / "d", 0.4, None, 0, tmp_path / "out")
    unlabeled = unlabeled_data(labeled, tmp_path / "d", 0.4, None, 0, tmp_path / "out", generate=False)
    assert len(labeled) == 2 and len(unlabeled) == 3
    with pytest.raises(ValueError, match="datalist"):
        labeled_data(labeled_ratio=0.4)
    with pytest.raises(FileNotFoundError, match="no dataset.json"):  # an empty folder is never generated into
        labeled_data(tmp_path / "empty", 0.4, generate=False)
    assert not (tmp_path / "empty").exists() or not any((tmp_path / "empty").iterdir())


def test_too_few_unlabeled_images_fall_back_to_the_labeled_ones(tmp_path):
    from cpcl_bundle.data import unlabeled_data

    (tmp_path / "a.nii.gz").write_bytes(b"x")
    (tmp_path / "b.nii.gz").write_bytes(b"x")
    labeled = [
        {"image": str(tmp_path / "a.nii.gz"), "label": "la"},
        {"image": str(tmp_path / "b.nii.gz"), "label": "lb"},
    ]
    got = unlabeled_data(labeled, tmp_path / "elsewhere", min_count=2)  # every study annotated
    assert got == [{"image": str(tmp_path / "a.nii.gz")}, {"image": str(tmp_path / "b.nii.gz")}]


def test_generate_data_may_carry_the_generators_options(tmp_path):
    """The phantoms_tumour preset's ``generate_data: {"tumour_label": true}``: generated with that option on first
    use, through ensure_dataset and through the cached split the labeled and unlabeled streams share."""
    from cpcl_bundle.data import ensure_dataset, labeled_data

    small = {"num_training": 3, "num_validation": 1, "num_test": 1, "scale": 0.3, "workers": 1}
    datalist = json.loads(ensure_dataset(tmp_path / "a", generate={"tumour_label": True, **small}).read_text())
    assert datalist["labels"] == {"0": "background", "1": "kidney", "2": "tumour"}
    assert datalist["generator"]["options"] == {"tumour_label": True, "scale": 0.3}
    labeled = labeled_data(tmp_path / "b", 0.34, None, 0, None, {"tumour_label": True, **small})
    assert len(labeled) == 1
    assert json.loads((tmp_path / "b" / "dataset.json").read_text())["generator"]["options"]["tumour_label"] is True
