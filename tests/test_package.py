# Copyright (c) 2026 The CPCL bundle authors
# SPDX-License-Identifier: Apache-2.0
"""scripts/package.py: the zoo release zip, reproducible, downloadable with `python -m monai.bundle download`
from a local `python -m http.server`, and runnable from the downloaded copy."""

import hashlib
import importlib.util
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


def load_package_module():
    spec = importlib.util.spec_from_file_location("cpcl_release_package", ROOT / "scripts" / "package.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


pkg = load_package_module()


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
    for package in ("cpcl_bundle", "scripts"):
        files |= {f"{package}/{p.name}" for p in (bundle / package).glob("*.py")}
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
    (bundle / "scripts" / "make_phantoms.py").chmod(0o755)
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


def test_download_from_http_server_and_infer_from_the_downloaded_copy(release, tmp_path):
    """The issue's path: `python -m http.server` serves the zip, `python -m monai.bundle download --url` fetches
    and extracts it, `python -m monai.bundle run` infers from the downloaded copy, importing its cpcl_bundle."""
    env = subprocess_env()
    log = open(tmp_path / "http_server.log", "w")
    server = subprocess.Popen(  # port 0: the OS picks a free one, the server prints it
        [
            sys.executable,
            "-u",
            "-m",
            "http.server",
            "0",
            "--bind",
            "127.0.0.1",
            "--directory",
            str(release.path.parent),
        ],
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    try:
        line = server.stdout.readline()  # "Serving HTTP on 127.0.0.1 port 41234 (http://127.0.0.1:41234/) ..."
        match = re.search(r"port (\d+)", line)
        assert match, f"http.server did not start: {line!r}"
        url = f"http://127.0.0.1:{match.group(1)}/{release.path.name}"
        bundles = tmp_path / "bundles"
        cmd = [
            sys.executable,
            "-m",
            "monai.bundle",
            "download",
            "--name",
            BUNDLE_NAME,
            "--url",
            url,
            "--bundle_dir",
            str(bundles),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    finally:
        server.terminate()  # by PID
        server.wait(timeout=30)
        server.stdout.close()
        log.close()
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
