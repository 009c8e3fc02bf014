# Copyright (c) 2026 The CPCL bundle authors
# SPDX-License-Identifier: Apache-2.0
"""scripts/package.py: the zoo release zip, reproducible, downloadable with `python -m monai.bundle download`
from a local `python -m http.server`, and runnable from the downloaded copy."""

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from cpcl_bundle import BUNDLE_NAME, __version__
from cpcl_bundle.synthetic import generate_case
from cpcl_tools.metadata import CLASS_CONFIGS
from tests.helpers import load_script

ROOT = Path(__file__).resolve().parents[1]
TOP_LEVEL_NOT_COPIED = {".git", ".pytest_cache", ".benchmarks", "data", "eval", "runs", "dist", "build", "models"}
JUNK = [  # planted in the copy: none of it may reach the zip
    "eval/inference/case_seg.nii.gz",
    "data/phantoms/dataset.json",
    "runs/events.out.tfevents.1",
    "dist/old_v0.0.1.zip",
    "cpcl_bundle/__pycache__/data.cpython-311.pyc",
    "cpcl_bundle/notes.txt",
    "scripts/__pycache__/package.cpython-311.pyc",
    "scripts/notes.txt",
    "configs/monailabel_train.json",
    "configs/.train.json.swp",
    "docs/.DS_Store",
    "models/model.ts",
    "models/model_best.pt",
    "large_files.yml",
    ".git/HEAD",
    ".venv/bin/python",
    "tests/test_extra.py",
]
SERVER_START_TIMEOUT_S = 30


pkg = load_script("package", "cpcl_release_package")


def random_weights(config_file: Path, path: Path, seed: int = 0) -> None:
    """A plain state dict of the inference config's network_def (what train.json's CheckpointSaver writes)."""
    parser = ConfigParser()
    parser.read_config(str(config_file))
    torch.manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(parser.get_parsed_content("network_def").state_dict(), path)


def subprocess_env(**extra: str) -> dict:
    env = dict(os.environ, NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost", **extra)
    for key in ("PYTHONDONTWRITEBYTECODE", "PYTHONPYCACHEPREFIX"):  # the import check below reads __pycache__
        env.pop(key, None)
    return env


def sha1(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A copy of this checkout (dir name unlike the bundle's), with random weights, the root metadata.json link,
    and planted outputs, caches and other files a release must not contain."""
    root = tmp_path_factory.mktemp("src") / "checkout"

    def ignore(folder, names):
        skipped = {n for n in names if n == "__pycache__" or n.endswith(".egg-info") or n.startswith(".venv")}
        return skipped | (set(names) & TOP_LEVEL_NOT_COPIED if Path(folder) == ROOT else set())

    shutil.copytree(ROOT, root, symlinks=True, ignore=ignore)
    assert (root / "metadata.json").is_symlink()
    random_weights(root / "configs" / "inference.json", root / "models" / "model.pt")
    for rel in JUNK:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"not for release\n")
    return root


@pytest.fixture(scope="module")
def release(bundle, tmp_path_factory):
    return pkg.build(bundle, out_dir=tmp_path_factory.mktemp("dist_a"))


def expected_files(bundle: Path) -> set[str]:
    """The release's files, listed independently of scripts/package.py."""
    files = {"LICENSE", "README.md", "pyproject.toml", "configs/logging.conf", "models/model.pt"}
    files |= {f"configs/{p.name}" for p in (bundle / "configs").glob("*.json")} - {"configs/monailabel_train.json"}
    files |= {f"configs/presets/{p.name}" for p in (bundle / "configs" / "presets").glob("*.json")}
    # the published case lists the preparation scripts read
    files |= {"configs/splits/la2018/train.list", "configs/splits/la2018/test.list"}
    files |= {f"configs/splits/brats2019/{n}.txt" for n in ("train", "val", "test")}
    files |= {p.relative_to(bundle).as_posix() for p in (bundle / "docs").rglob("*") if p.is_file()}
    files -= {"docs/.DS_Store"}
    files |= {f"cpcl_bundle/{p.name}" for p in (bundle / "cpcl_bundle").glob("*.py")}  # the runtime, no tool
    return files


def test_zip_has_the_zoo_layout(bundle, release):
    assert release.path.name == f"{BUNDLE_NAME}_v{__version__}.zip"
    assert "_v" not in BUNDLE_NAME and re.split(r"_v\d*.", release.path.name)[0] == BUNDLE_NAME  # as the zoo parses
    assert release.sha1 == sha1(release.path)
    with zipfile.ZipFile(release.path) as zf:
        infos = zf.infolist()
        names = [i.filename for i in infos]
        assert names == sorted(set(names))
        assert all(n.startswith(f"{BUNDLE_NAME}/") and not n.endswith("/") for n in names)  # one folder, no dirs
        assert {i.date_time for i in infos} == {(2022, 5, 30, 0, 0, 0)}
        assert {(i.external_attr >> 16, i.create_system, i.compress_type, i.extra) for i in infos} == {
            (0o100644, 3, zipfile.ZIP_DEFLATED, b"")
        }
        stored = {n.split("/", 1)[1] for n in names}
        assert stored == expected_files(bundle)
        assert "metadata.json" not in stored and "configs/metadata.json" in stored
        assert not [n for n in stored if n.split("/")[0] in ("scripts", "cpcl_tools", "tests")]  # no tool
        for rel in stored:  # same bytes as the sources (metadata.json included, models/model.pt too)
            assert zf.read(f"{BUNDLE_NAME}/{rel}") == (bundle / rel).read_bytes(), rel
    assert json.loads((bundle / "configs" / "metadata.json").read_text())["version"] == __version__
    assert not any(j in stored for j in JUNK)


def test_same_inputs_give_the_same_sha1(bundle, release, tmp_path):
    """Rebuilt after every file got a new mtime and one a new mode: same bytes (timestamps, order, modes fixed)."""
    later = time.time() + 3600
    for path in bundle.rglob("*"):
        if not path.is_symlink():
            os.utime(path, (later, later))
    (bundle / "cpcl_bundle" / "synthetic.py").chmod(0o755)
    again = pkg.build(bundle, out_dir=tmp_path, check_weights_=False)
    print(f"sha1 first build {release.sha1}, second build {again.sha1}")
    assert again.sha1 == release.sha1
    assert again.path.read_bytes() == release.path.read_bytes()


def test_cli_prints_the_model_info_entry(bundle, release, tmp_path):
    cmd = [
        sys.executable,
        str(ROOT / "scripts" / "package.py"),
        "--bundle_root",
        str(bundle),
        "--out_dir",
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    key = f"{BUNDLE_NAME}_v{__version__}"
    url = (
        f"https://api.ngc.nvidia.com/v2/models/nvidia/monaihosting/{BUNDLE_NAME}/versions/{__version__}"
        f"/files/{key}.zip"
    )
    assert json.loads(proc.stdout) == {key: {"checksum": release.sha1, "source": url}}  # a third build, same sha1
    assert sha1(tmp_path / f"{key}.zip") == release.sha1
    assert release.entry == json.loads(proc.stdout)


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")
def test_torchscript_only_when_asked(bundle, release, tmp_path):
    assert f"{BUNDLE_NAME}/models/model.ts" not in zipfile.ZipFile(release.path).namelist()  # though it exists
    planted = bundle / "models" / "model.ts"  # not TorchScript: refused when checked, stored when not
    with pytest.raises(pkg.PackagingError, match="not a TorchScript file"):
        pkg.build(bundle, out_dir=tmp_path, torchscript=True)
    with_ts = pkg.build(bundle, out_dir=tmp_path, torchscript=str(planted), check_weights_=False)
    with zipfile.ZipFile(with_ts.path) as zf:
        assert zf.read(f"{BUNDLE_NAME}/models/model.ts") == planted.read_bytes()
    with pytest.raises(pkg.PackagingError, match="ckpt_export"):
        pkg.build(bundle, out_dir=tmp_path, torchscript=tmp_path / "missing.ts", check_weights_=False)


def test_missing_weights_name_the_training_command(bundle, tmp_path, capsys):
    with pytest.raises(pkg.PackagingError, match=re.escape(pkg.TRAIN_COMMAND)):
        pkg.build(bundle, out_dir=tmp_path, model=tmp_path / "model.pt")
    with pytest.raises(SystemExit) as exit_info:
        pkg.main(["--bundle_root", str(bundle), "--out_dir", str(tmp_path), "--model", str(tmp_path / "model.pt")])
    assert exit_info.value.code == 2
    assert "python -m monai.bundle run training --config_file configs/train.json" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def _minimal_bundle(src: Path, dst: Path, version: str = __version__, name: str = BUNDLE_NAME, meta=None) -> Path:
    for rel in ("LICENSE", "configs/inference.json", "configs/metadata.json", "cpcl_bundle/__init__.py"):
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src / rel, dst / rel)
    init = dst / "cpcl_bundle" / "__init__.py"
    text = init.read_text().replace(f'__version__ = "{__version__}"', f'__version__ = "{version}"')
    init.write_text(text.replace(f'BUNDLE_NAME = "{BUNDLE_NAME}"', f'BUNDLE_NAME = "{name}"'))
    if meta is not None:
        (dst / "configs" / "metadata.json").write_text(json.dumps(meta))
    return dst


@pytest.mark.parametrize(
    "case, message",
    [
        ("version_mismatch", "version mismatch"),
        ("not_in_changelog", "not a key of the changelog"),
        ("name_with_v", "without '_v'"),
        ("wrapped_checkpoint", "not a plain state dict"),
        ("wrong_network", "does not fit network_def"),
    ],
)
def test_release_checks(bundle, tmp_path, case, message):
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    kwargs = {}
    if case == "version_mismatch":
        kwargs["version"] = "9.9.9"
    elif case == "not_in_changelog":
        kwargs["version"] = "9.9.9"
        kwargs["meta"] = dict(meta, version="9.9.9")
    elif case == "name_with_v":
        kwargs["name"] = "cpcl_vessel_segmentation"
    root = _minimal_bundle(bundle, tmp_path / "b", **kwargs)
    model = tmp_path / "model.pt"
    state = torch.load(bundle / "models" / "model.pt", weights_only=True)
    if case == "wrapped_checkpoint":
        state = {"model": state, "epoch": torch.tensor(3)}
    elif case == "wrong_network":
        state = {"conv.weight": torch.zeros(1)}
    torch.save(state, model)
    with pytest.raises(pkg.PackagingError, match=re.escape(message)):
        pkg.build(root, out_dir=tmp_path / "dist", model=model)
    assert not (tmp_path / "dist").exists()


@contextlib.contextmanager
def http_server(folder: Path, log_file: Path):
    """``python -m http.server`` on 127.0.0.1 serving ``folder``; yields its base URL; stopped by its PID."""
    log = open(log_file, "w")
    server = subprocess.Popen(  # port 0: the OS picks a free one, the server prints it
        [sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1", "--directory", str(folder)],
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
        env=subprocess_env(),
        cwd=log_file.parent,
    )
    try:
        line = server.stdout.readline()  # "Serving HTTP on 127.0.0.1 port 41234 (http://127.0.0.1:41234/) ..."
        match = re.search(r"port (\d+)", line)
        assert match, f"http.server did not start: {line!r}"
        yield f"http://127.0.0.1:{match.group(1)}"
    finally:
        server.terminate()  # by PID
        server.wait(timeout=30)
        server.stdout.close()
        log.close()


def test_download_from_http_server_and_infer_from_the_downloaded_copy(release, tmp_path):
    """The issue's path: `python -m http.server` serves the zip, `python -m monai.bundle download --url` fetches
    and extracts it, `python -m monai.bundle run` infers from the downloaded copy, importing its cpcl_bundle."""
    env = subprocess_env()
    bundles = tmp_path / "bundles"
    with http_server(release.path.parent, tmp_path / "http_server.log") as base_url:
        cmd = [
            sys.executable,
            "-m",
            "monai.bundle",
            "download",
            "--name",
            BUNDLE_NAME,
            "--url",
            f"{base_url}/{release.path.name}",
            "--bundle_dir",
            str(bundles),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f'"GET /{release.path.name} HTTP/1.1" 200' in (tmp_path / "http_server.log").read_text()
    assert sha1(bundles / f"{BUNDLE_NAME}.zip") == release.sha1
    dl = bundles / BUNDLE_NAME
    with zipfile.ZipFile(release.path) as zf:
        for name in zf.namelist():
            assert (bundles / name).read_bytes() == zf.read(name), name
        extracted = {p.relative_to(bundles).as_posix() for p in dl.rglob("*") if p.is_file()}
        assert extracted == set(zf.namelist())
    assert (dl / "configs" / "metadata.json").is_file() and not (dl / "cpcl_bundle" / "__pycache__").exists()

    inputs, out = tmp_path / "inputs", tmp_path / "pred"
    inputs.mkdir()
    image, _, affine = generate_case(seed=7, scale=0.5)
    nib.save(nib.Nifti1Image(image, affine), inputs / "case.nii.gz")
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        str(dl / "configs" / "inference.json"),
        "--bundle_root",
        str(dl),
        "--dataset_dir",
        str(inputs),
        "--output_dir",
        str(out),
        "--sw_roi_size",
        "[32,32,32]",
    ]
    start = time.time()
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env=subprocess_env(PYTHONPATH=str(dl)), cwd=tmp_path, timeout=300
    )
    print(f"inference from the downloaded copy: {time.time() - start:.1f} s")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # cpcl_bundle came from the downloaded copy: Python compiled it there (the checkout's copy would have
    # written its own __pycache__), including the transforms module the preprocessing uses
    cached = {p.name.split(".")[0] for p in (dl / "cpcl_bundle" / "__pycache__").glob("*.pyc")}
    assert {"__init__", "transforms"} <= cached, cached
    pred, src = nib.load(out / "case_seg.nii.gz"), nib.load(inputs / "case.nii.gz")
    assert pred.shape == src.shape
    assert np.allclose(pred.affine, src.affine, atol=1e-4)
    assert set(np.unique(np.asarray(pred.dataobj)).tolist()) <= {0, 1}


def test_large_files_yml_lets_the_zoo_download_the_weights(bundle, tmp_path):
    """--large_files_url writes large_files.yml (md5 of the weights) for the source tree, --eval_summary records the
    evaluation as eval_metrics; `python -m monai.bundle download_large_files` (what the zoo's CI runs) then fetches
    the weights from a 127.0.0.1 server into a tree without them, and refuses a file whose md5 differs."""
    src = tmp_path / "src"
    shutil.copytree(bundle, src, symlinks=True)
    weights = src / "models" / "model.pt"
    summary = tmp_path / "metrics_summary.json"
    summary.write_text(
        json.dumps(
            {
                "num_cases": 20,
                "dice": {"mean": 0.72981, "std": 0.1},
                "jaccard": {"mean": 0.58523, "std": 0.1},
                "hd95_mm": {"mean": 60.2011, "std": 25.0},
                "asd_mm": {"mean": 12.9744, "std": 10.0},
                "metric_definition": "paper",
            }
        )
    )
    hosted = tmp_path / "hosted"
    with http_server(hosted, tmp_path / "http_server.log") as base_url:
        release = pkg.build(
            src, out_dir=tmp_path / "dist", large_files_url=base_url + "/{name}/v{version}/{file}", eval_summary=summary
        )
        md5 = hashlib.md5(weights.read_bytes()).hexdigest()
        assert release.large_files == src / "large_files.yml" and release.model_md5 == md5
        parser = ConfigParser()
        parser.read_config(str(release.large_files))
        url = f"{base_url}/{BUNDLE_NAME}/v{__version__}/model.pt"
        assert parser.get()["large_files"] == [
            {"path": "models/model.pt", "url": url, "hash_val": md5, "hash_type": "md5"}
        ]
        expected_metrics = {
            "mean_dice": 0.7298,
            "mean_jaccard": 0.5852,
            "mean_hd95_mm": 60.2011,
            "mean_asd_mm": 12.9744,
            "num_cases": 20,
            "metric_definition": "paper",
            "model_md5": md5,
        }
        meta_text = (src / "configs" / "metadata.json").read_text()
        assert json.loads(meta_text)["eval_metrics"] == expected_metrics
        assert meta_text.startswith('{\n    "schema"')  # still 4-space JSON in its key order
        with zipfile.ZipFile(release.path) as zf:  # the zip carries the weights and the metrics, not the list
            assert f"{BUNDLE_NAME}/large_files.yml" not in zf.namelist()
            assert zf.read(f"{BUNDLE_NAME}/models/model.pt") == weights.read_bytes()
            assert json.loads(zf.read(f"{BUNDLE_NAME}/configs/metadata.json"))["eval_metrics"] == expected_metrics

        tree = tmp_path / "zoo_tree"  # the source tree as the zoo holds it: large_files.yml, no weights
        shutil.copytree(src, tree, symlinks=True, ignore=shutil.ignore_patterns("*.pt"))
        assert not (tree / "models" / "model.pt").exists()
        cmd = [sys.executable, "-m", "monai.bundle", "download_large_files", "--bundle_path", str(tree)]
        run = dict(capture_output=True, text=True, env=subprocess_env(), cwd=tmp_path, timeout=300)
        (hosted / BUNDLE_NAME / f"v{__version__}").mkdir(parents=True)
        served = hosted / BUNDLE_NAME / f"v{__version__}" / "model.pt"
        served.write_bytes(weights.read_bytes()[:-1] + b"x")  # one byte off: the md5 check must refuse it
        proc = subprocess.run(cmd, **run)
        assert proc.returncode != 0 and "md5" in (proc.stdout + proc.stderr).lower(), proc.stderr[-2000:]
        (tree / "models" / "model.pt").unlink(missing_ok=True)
        shutil.copy(weights, served)
        proc = subprocess.run(cmd, **run)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tree / "models" / "model.pt").read_bytes() == weights.read_bytes()
    log = (tmp_path / "http_server.log").read_text()
    assert log.count(f'"GET /{BUNDLE_NAME}/v{__version__}/model.pt HTTP/1.1" 200') == 2, log


THREE = ["background", "kidney", "tumour"]


@pytest.mark.filterwarnings("ignore:`torch.jit")
def test_a_model_with_other_classes_is_released_with_them(bundle, tmp_path):
    """--classes: the zip's inference.json and train.json carry the classes, its metadata.json describes three
    output channels (what MONAI Label names its labels from), and the zoo's verify_net_in_out and ckpt_export pass
    on the unpacked zip; the source tree is unchanged. Without --classes such weights are refused, and metadata
    that does not describe inference.json's classes is refused."""
    from monai.bundle import ckpt_export, verify_net_in_out

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser["classes"] = THREE
    weights = tmp_path / "model3.pt"
    torch.save(parser.get_parsed_content("network_def").state_dict(), weights)
    sources = {rel: (bundle / rel).read_bytes() for rel in ("configs/metadata.json", *CLASS_CONFIGS)}
    with pytest.raises(pkg.PackagingError, match="pass them with --classes"):
        pkg.build(bundle, out_dir=tmp_path / "refused", model=weights)
    release = pkg.build(bundle, out_dir=tmp_path / "dist", model=weights, classes=THREE)
    assert {rel: (bundle / rel).read_bytes() for rel in sources} == sources
    with zipfile.ZipFile(release.path) as zf:
        zf.extractall(tmp_path / "unpacked")
    root = tmp_path / "unpacked" / BUNDLE_NAME
    meta = json.loads((root / "configs" / "metadata.json").read_text())
    pred = meta["network_data_format"]["outputs"]["pred"]
    assert pred["num_channels"] == 3 and pred["channel_def"] == {"0": "background", "1": "kidney", "2": "tumour"}
    assert meta["label_classes"] == "0 background, 1 kidney, 2 tumour"
    for rel in CLASS_CONFIGS:
        text = (root / rel).read_text()
        assert json.loads(text)["classes"] == THREE and text.startswith("{\n    ")
    meta_file, config_file = str(root / "configs" / "metadata.json"), str(root / "configs" / "inference.json")
    verify_net_in_out(net_id="network_def", meta_file=meta_file, config_file=config_file, bundle_root=str(root))
    ckpt_export(
        net_id="network_def",
        filepath=str(tmp_path / "model.ts"),
        ckpt_file=str(root / "models" / "model.pt"),
        meta_file=meta_file,
        config_file=config_file,
        bundle_root=str(root),
    )
    assert torch.jit.load(str(tmp_path / "model.ts"))(torch.zeros(1, 1, 32, 32, 32)).shape[1] == 3

    mismatched = _minimal_bundle(bundle, tmp_path / "mismatched")
    (mismatched / "configs" / "metadata.json").write_text((root / "configs" / "metadata.json").read_text())
    with pytest.raises(pkg.PackagingError, match="describes the output channels as"):
        pkg.check_bundle(mismatched)
