# Copyright (c) 2026 The CPCL bundle authors
# SPDX-License-Identifier: Apache-2.0
"""The model zoo's premerge job on the bundle as the release tree lays it out, in the zoo's environment.

The environment is the one ``scripts/setup_zoo_env.sh`` builds: Python 3.10 with exactly the pins of
``configs/metadata.json`` (``monai==``, ``torch==``, ``numpy==`` and each ``required_packages_version`` entry, as the
zoo's ``ci/get_bundle_requirements.py`` writes them) and nothing else. The release zip of ``scripts/package.py``
is unpacked into a zoo-shaped folder (``models/cpcl_kidney_ct_segmentation/`` and the smoke test in
``ci/unit_tests/``), and the steps of the zoo's ``ci/verify_bundle.py -m min`` run there with the MONAI functions
it calls (directory, version and changelog, ``verify_metadata`` against the offline 20240725 schema,
``verify_net_in_out``, ``ckpt_export`` and loading the TorchScript), then the zoo's unit-test runner's smoke test.

Skips when the environment is missing, fails instead under ``CPCL_REQUIRE_ZOO_ENV=1`` (CI builds it first).
"""

import json
import os
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

from cpcl_bundle import BUNDLE_NAME

from .test_package import pkg, random_weights

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(os.environ.get("CPCL_ZOO_VENV", Path.home() / ".cache" / "cpcl" / "venv-zoo-py310"))
PYTHON = VENV / "bin" / "python"
SCHEMA = ROOT / "tests" / "data" / "meta_schema_20240725.json"

pytestmark = [pytest.mark.slow, pytest.mark.zoo]

# run by the zoo environment's Python from the zoo root; every failure is an assertion naming the step
VERIFY_MIN = r"""
import importlib.metadata as m
import json
import os
import shutil
import sys

import torch
from monai.bundle import ckpt_export, verify_metadata, verify_net_in_out

bundle = os.path.join("models", sys.argv[1])
meta_file = os.path.join(bundle, "configs", "metadata.json")
meta = json.load(open(meta_file))
assert sys.version_info[:2] == (3, 10), f"python {sys.version}"
pins = {"monai": meta["monai_version"], "torch": meta["pytorch_version"], "numpy": meta["numpy_version"]}
pins.update(meta["required_packages_version"])
found = {name: m.version(name).split("+")[0] for name in pins}
assert found == pins, f"installed {found} != pinned {pins}"
print(f"pins: {len(pins)} packages as metadata.json pins them on Python {sys.version.split()[0]}")

for rel in ("configs/metadata.json", "LICENSE", "configs/inference.json", "models/model.pt"):
    assert os.path.isfile(os.path.join(bundle, rel)), f"verify_bundle_directory: {rel} missing"
assert not os.path.exists(os.path.join(bundle, "large_files.yml")), "the release carries its weights"
assert meta["version"] in meta["changelog"], "verify_version_changes: version not in changelog"
print("directory, version and changelog verified")

os.makedirs(os.path.join(bundle, "eval"), exist_ok=True)
shutil.copy(sys.argv[2], os.path.join(bundle, "eval", "schema.json"))
verify_metadata(meta_file=meta_file, filepath=os.path.join(bundle, "eval", "schema.json"))
print("metadata verified")
inference = os.path.join(bundle, "configs", "inference.json")
verify_net_in_out(net_id="network_def", meta_file=meta_file, config_file=inference, bundle_root=bundle)
print("data shape verified")
ts = os.path.join(bundle, "models", "verify_model.ts")
ckpt_export(
    net_id="network_def",
    filepath=ts,
    ckpt_file=os.path.join(bundle, "models", "model.pt"),
    meta_file=meta_file,
    config_file=inference,
    bundle_root=bundle,
)
torch.jit.load(ts)
print("export weights into TorchScript module successfully")
"""


def zoo_python() -> Path:
    if not PYTHON.is_file():
        reason = f"no zoo environment at {VENV}: run scripts/setup_zoo_env.sh"
        if os.environ.get("CPCL_REQUIRE_ZOO_ENV") == "1":
            pytest.fail(reason + " (CPCL_REQUIRE_ZOO_ENV=1)", pytrace=False)
        pytest.skip(reason)
    return PYTHON


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """A zoo checkout's shape: the release zip unpacked in models/, the smoke test in ci/unit_tests/."""
    python = zoo_python()
    tmp = tmp_path_factory.mktemp("zoo_premerge")
    weights = tmp / "model.pt"
    random_weights(ROOT / "configs" / "inference.json", weights)
    release = pkg.build(ROOT, out_dir=tmp / "dist", model=weights)
    root = tmp / "model-zoo"
    with zipfile.ZipFile(release.path) as zf:
        zf.extractall(root / "models")
    (root / "ci" / "unit_tests").mkdir(parents=True)
    shutil.copy(ROOT / "tests" / f"test_{BUNDLE_NAME}.py", root / "ci" / "unit_tests")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "CPCL_BUNDLE_ROOT"))}
    env["PYTHONPATH"] = str(root)  # as the zoo's run_premerge scripts export it
    return python, root, env


def run(cmd: list[str], root: Path, env: dict, timeout: int) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    print(proc.stdout[-2000:])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    return proc


def test_verify_bundle_min_passes_on_the_release_tree_under_python_310(zoo):
    python, root, env = zoo
    proc = run([str(python), "-c", VERIFY_MIN, BUNDLE_NAME, str(SCHEMA)], root, env, timeout=900)
    assert "export weights into TorchScript module successfully" in proc.stdout
    meta = json.loads((root / "models" / BUNDLE_NAME / "configs" / "metadata.json").read_text())
    assert meta["schema"].endswith(SCHEMA.name)


def test_the_zoo_smoke_test_passes_under_python_310(zoo):
    """The zoo's runner imports ci/unit_tests/test_<bundle>.py; here it runs as a script, finding the bundle in
    models/ by the zoo's layout (no CPCL_BUNDLE_ROOT): train, evaluate and infer on tiny phantoms."""
    python, root, env = zoo
    proc = run([str(python), f"ci/unit_tests/test_{BUNDLE_NAME}.py", "-v"], root, env, timeout=1800)
    assert "OK" in proc.stderr.splitlines()[-1]


def test_the_zoo_environment_holds_nothing_but_the_pins():
    """The bundle may import nothing that metadata.json does not pin: the environment has no extra top-level
    package that a developer's machine would have (matplotlib, pytest, medpy, mlflow)."""
    python = zoo_python()
    probe = (
        "import importlib.util as u; print([n for n in ('matplotlib', 'pytest', 'medpy', 'mlflow') if u.find_spec(n)])"
    )
    proc = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr
