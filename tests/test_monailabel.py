# Copyright (c) 2026 The CPCL bundle authors
# SPDX-License-Identifier: Apache-2.0
"""The bundle served by a real MONAI Label 0.8.5 server (the `monaibundle` sample app), offline, on CPU.

MONAI Label lives in its own environment, ``.venv-label`` (``scripts/setup_monailabel.sh``; it downgrades numpy,
so it never shares the bundle's). This test installs nothing: without that venv it is skipped, or fails when
``CPCL_REQUIRE_MONAILABEL=1`` (CI). The server runs on temporary copies of the app, the bundle and a studies
folder; it binds 127.0.0.1 and is stopped by its process group.
"""

import concurrent.futures
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from cpcl_bundle import BUNDLE_NAME
from cpcl_tools.metadata import CLASS_CONFIGS, with_classes

pytestmark = [pytest.mark.monailabel, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(os.environ.get("CPCL_LABEL_VENV", ROOT / ".venv-label"))
LABEL_PYTHON = VENV / "bin" / "python"
# what a user copies into <app>/model/<name>: no data/, eval/, tests/, .git, venvs
BUNDLE_ITEMS = ("configs", "cpcl_bundle", "docs", "models", "LICENSE", "README.md", "metadata.json")
# 3 unlabeled: at least unlabeled_batch_size (2, drop_last), and a count that differs from the labeled one
NUM_IMAGES, NUM_LABELED = 5, 2
START_TIMEOUT, INFER_TIMEOUT = 120, 120
# one MONAI Label epoch is the bundle's `iterations_per_epoch` (50) CPCL iterations at 48^3: 2-3 s each on 2 idle
# cores, about 8 s while another training shares them (measured 385 s)
TRAIN_TIMEOUT = float(os.environ.get("CPCL_MONAILABEL_TRAIN_TIMEOUT", 600))
# sent with the train request when the bundle exposes it as a MONAI Label train option (displayable_configs)
SHORT_EPOCH = 2
#: the load: LOAD_REQUESTS inference requests sent at once from LOAD_WORKERS client threads while a training runs,
#: spread over LOAD_IMAGES unannotated studies (each also inferred alone before, for the reference label)
LOAD_REQUESTS, LOAD_WORKERS, LOAD_IMAGES = 20, 20, 2
#: every answer of the load within this many seconds of the first request (MONAI Label 0.8.5 answers them one after
#: the other: the last waits for the 19 others)
LOAD_TIMEOUT = float(os.environ.get("CPCL_MONAILABEL_LOAD_TIMEOUT", 600))
#: the background training's epochs (of 50 iterations): longer than the load, which takes well under a minute on an
#: idle machine; it is stopped through ``DELETE /train/`` once the load is answered
LOAD_TRAIN_EPOCHS = 4


def _label_python() -> Path:
    if LABEL_PYTHON.exists():
        return LABEL_PYTHON
    reason = f"MONAI Label venv missing ({LABEL_PYTHON}): run scripts/setup_monailabel.sh"
    if os.environ.get("CPCL_REQUIRE_MONAILABEL") == "1":
        pytest.fail(reason + " (CPCL_REQUIRE_MONAILABEL=1)", pytrace=False)
    pytest.skip(reason)


def _sample_app() -> Path:
    candidates = [VENV / "monailabel" / "sample-apps" / "monaibundle"]
    candidates += sorted(VENV.glob("lib/python3*/site-packages/monailabel/sample-apps/monaibundle"))
    for c in candidates:
        if (c / "main.py").is_file():
            return c
    pytest.fail(f"no monaibundle sample app in {VENV} (looked at {[str(c) for c in candidates]})", pytrace=False)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(url: str, data: bytes | None = None, headers: dict | None = None, timeout: float = 30, method=None):
    method = method or ("GET" if data is None else "POST")
    req = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.status, r.read()


def _copy_bundle(target: Path, classes: list[str] | None = None) -> Path:
    """The bundle as a user copies it into ``<app>/model/<name>``; with ``classes``, configured for them as
    ``scripts/package.py --classes`` releases it (``classes`` in train.json and inference.json, the output channels
    in metadata.json, where MONAI Label reads its label names)."""
    target.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.pt", "*.ts", "*.onnx")
    for name in BUNDLE_ITEMS:
        src = ROOT / name
        if src.is_symlink():
            os.symlink(os.readlink(src), target / name)
        elif src.is_dir():
            shutil.copytree(src, target / name, ignore=ignore)
        elif src.is_file():
            shutil.copy2(src, target / name)
    if classes is not None:
        for rel in ("configs/metadata.json", *CLASS_CONFIGS):
            config = json.loads((target / rel).read_text())
            (target / rel).write_text(json.dumps(with_classes(rel, config, classes), indent=4))
    (target / "models").mkdir(exist_ok=True)
    # MONAI Label hides a bundle without models/model.pt; random weights suffice for geometry checks
    parser = ConfigParser()
    parser.read_config(str(target / "configs" / "inference.json"))
    torch.manual_seed(0)
    torch.save(parser.get_parsed_content("network_def").state_dict(), target / "models" / "model.pt")
    return target


def _app_with_bundle(tmp_path: Path, classes: list[str] | None = None) -> tuple[Path, Path]:
    """A temporary copy of the ``monaibundle`` sample app with a copy of this bundle (random weights) as its model."""
    app = tmp_path / "app"
    shutil.copytree(_sample_app(), app, ignore=shutil.ignore_patterns("__pycache__"))
    return app, _copy_bundle(app / "model" / BUNDLE_NAME, classes)


def _train_request(info: dict, bundle: Path, max_epochs: int, iterations_per_epoch: int | None = None) -> dict:
    """The body of ``POST /train/<model>``: CPU, no validation split, no tracking. When the bundle exposes train
    options (``displayable_configs``), MONAI Label reads every one of them from the request: so they are all sent,
    with ``iterations_per_epoch`` set when given."""
    request = {"max_epochs": max_epochs, "device": "cpu", "val_split": 0, "multi_gpu": False, "tracking": "None"}
    options = info["trainers"][BUNDLE_NAME].get("config", {})
    if "iterations_per_epoch" in options:
        request.update({k: options[k] for k in _displayable(bundle)})
        if iterations_per_epoch is not None:
            request["iterations_per_epoch"] = iterations_per_epoch
    return request


#: the shipped binary bundle, and kidney + tumour (phantoms with ``tumour_label``: the tumour is label 2)
CLASSES = {"binary": None, "kidney_tumour": ["background", "kidney", "tumour"]}


@pytest.fixture(scope="module", params=list(CLASSES))
def studies(request, tmp_path_factory):
    """NUM_IMAGES phantoms as ``<studies>/<id>.nii.gz``; the first NUM_LABELED have ``labels/final/<id>.nii.gz``;
    with the classes of the bundle they are served by (None: the shipped ones)."""
    from cpcl_bundle.synthetic import generate_dataset

    _label_python()  # skip before generating anything
    classes = CLASSES[request.param]
    generated = tmp_path_factory.mktemp("phantoms")
    options = {"tumour_label": True} if classes else {}
    datalist = json.loads(
        Path(
            generate_dataset(
                generated,
                num_training=NUM_IMAGES,
                num_validation=0,
                num_test=0,
                seed=1,
                workers=1,
                scale=0.5,
                **options,
            )
        ).read_text()
    )
    folder = tmp_path_factory.mktemp("studies")
    (folder / "labels" / "final").mkdir(parents=True)
    ids = []
    for i, item in enumerate(datalist["training"][:NUM_IMAGES]):
        case = f"kidney_{i:02d}"
        shutil.copy(generated / item["image"], folder / f"{case}.nii.gz")
        if i < NUM_LABELED:
            shutil.copy(generated / item["label"], folder / "labels" / "final" / f"{case}.nii.gz")
        ids.append(case)
    if classes:  # the annotations hold every class, or training on them tests less than it claims
        values = {
            int(v)
            for case in ids[:NUM_LABELED]
            for v in np.unique(nib.load(folder / "labels" / "final" / f"{case}.nii.gz").dataobj)
        }
        assert values == set(range(len(classes))), values
    return folder, ids[:NUM_LABELED], ids[NUM_LABELED:], classes


class Server:
    """``python -m monailabel.main start_server`` of the venv, in its own process group, logging to a file."""

    def __init__(self, app: Path, studies: Path, log: Path):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
        env["PATH"] = f"{VENV / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        env["PYTHONUNBUFFERED"] = "1"
        cmd = [
            str(LABEL_PYTHON),
            "-m",
            "monailabel.main",
            "start_server",
            "--app",
            str(app),
            "--studies",
            str(studies),
            "--conf",
            "models",
            BUNDLE_NAME,
            "--conf",
            "zoo_source",
            "github",
            "--conf",
            "sam2",
            "false",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
        ]
        self._log_file = open(log, "wb")
        self.proc = subprocess.Popen(
            cmd, stdout=self._log_file, stderr=subprocess.STDOUT, env=env, cwd=str(app), start_new_session=True
        )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def tail(self, n: int = 12000) -> str:
        return self.text()[-n:]

    def wait_ready(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"MONAI Label exited with {self.proc.returncode} before answering /info/")
            try:
                status, body = _request(f"{self.url}/info/", timeout=5)
                if status == 200:
                    return json.loads(body)
            except (urllib.error.URLError, OSError):  # ConnectionError and TimeoutError are OSErrors
                pass
            time.sleep(1)
        raise TimeoutError(f"MONAI Label did not answer /info/ within {timeout} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 15)):
                try:
                    os.killpg(self.proc.pid, sig)  # the group: the server and anything it started
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        # what the server started (a background training) may outlive it: end the rest of its group
        deadline = time.monotonic() + 15
        while self.members() and time.monotonic() < deadline:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                break
            time.sleep(0.5)
        self._log_file.close()

    def members(self) -> list[int]:
        """Live (not zombie) processes of the server's process group, the server included (Linux ``/proc``)."""
        return [pid for pid, (_, pgrp, state) in _processes().items() if pgrp == self.proc.pid and state != "Z"]

    def children(self, marker: str) -> list[int]:
        """Live child processes of the server whose command line contains ``marker``."""
        return [
            pid
            for pid, (ppid, _, state) in _processes().items()
            if ppid == self.proc.pid and state != "Z" and marker in _cmdline(pid)
        ]


def _processes() -> dict[int, tuple[int, int, str]]:
    """pid -> (parent pid, process group, state) of every process, from ``/proc/<pid>/stat``."""
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid pgrp ...
        except (OSError, IndexError):  # ended meanwhile
            continue
        table[int(stat.parent.name)] = (int(fields[1]), int(fields[2]), fields[0])
    return table


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _infer(server: Server, image_id: str, out: Path, timeout: float = INFER_TIMEOUT) -> Path:
    query = urllib.parse.urlencode({"image": image_id, "output": "image"})
    form = urllib.parse.urlencode({"params": json.dumps({"device": "cpu"})}).encode()
    status, body = _request(
        f"{server.url}/infer/{BUNDLE_NAME}?{query}",
        data=form,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        timeout=timeout,
    )
    assert status == 200
    out.write_bytes(body)
    return out


def _check_label(label_file: Path, image_file: Path, num_classes: int) -> np.ndarray:
    image, label = nib.load(str(image_file)), nib.load(str(label_file))
    assert label.shape == image.shape, (label.shape, image.shape)
    np.testing.assert_allclose(label.affine, image.affine, atol=1e-4)
    values = np.unique(np.asarray(label.dataobj))
    assert set(values.tolist()) <= set(range(num_classes)), values
    return values


def test_monailabel_serves_infers_and_trains_the_bundle(studies, tmp_path):
    _label_python()
    studies_dir, labeled, unlabeled, classes = studies
    app, bundle = _app_with_bundle(tmp_path, classes)
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    names = parser["classes"]
    assert classes is None or names == classes
    assert parser.get_parsed_content("out_channels") == len(names)
    model_pt = bundle / "models" / "model.pt"
    initial = (_sha256(model_pt), model_pt.stat().st_mtime_ns)
    times = {}

    t0 = time.monotonic()
    server = Server(app, studies_dir, tmp_path / "server.log")
    ok = False
    try:
        # --- the model is listed, as segmentation, with the label names of its classes
        info = server.wait_ready(START_TIMEOUT)
        times["server start"] = time.monotonic() - t0
        model = info["models"][BUNDLE_NAME]
        assert model["type"] == "segmentation", model
        assert set(names[1:]) <= set(model["labels"]), (names, model["labels"])
        assert BUNDLE_NAME in info["trainers"], sorted(info["trainers"])

        # --- inference on an unannotated study: a label of the input's grid, values among the class indices
        t = time.monotonic()
        label_file = _infer(server, unlabeled[0], tmp_path / "infer_1.nii.gz")
        times["infer"] = time.monotonic() - t
        _check_label(label_file, studies_dir / f"{unlabeled[0]}.nii.gz", len(names))

        # --- one epoch of CPCL training: labeled = annotated studies, unlabeled stream = the other studies
        request = _train_request(info, bundle, max_epochs=1, iterations_per_epoch=SHORT_EPOCH)
        t = time.monotonic()
        status, body = _request(
            f"{server.url}/train/{BUNDLE_NAME}?run_sync=true",
            data=json.dumps(request).encode(),
            headers={"Content-Type": "application/json"},
            timeout=TRAIN_TIMEOUT,
        )
        times["train (1 epoch)"] = time.monotonic() - t
        assert status == 200, body
        log = server.text()
        assert "Training Finished" in log
        if "iterations_per_epoch" in request:
            assert f"[{SHORT_EPOCH}/{SHORT_EPOCH}]" in log, "the iterations_per_epoch train option was not applied"
        assert "Engine run finished" in log or "Epoch[1] Complete" in log
        after = (_sha256(model_pt), model_pt.stat().st_mtime_ns)
        assert after[0] != initial[0] and after[1] != initial[1], "training did not rewrite models/model.pt"
        # the trained weights are those of a network with one output channel per class
        parser.get_parsed_content("network_def").load_state_dict(torch.load(model_pt, map_location="cpu"))

        # the labeled stream is exactly the annotated studies (MONAI Label's train#dataset#data override) ...
        override = _logged_override(log, "train#dataset#data")
        for case in labeled:
            assert str(studies_dir / f"{case}.nii.gz") in override, override
        for case in unlabeled:
            assert str(studies_dir / f"{case}.nii.gz") not in override, override
        # ... and the unlabeled stream is the studies without a label (cpcl_bundle.data.sibling_images):
        # the run's two CacheDatasets (no validation one: val_split 0) report their sizes
        sizes = [int(n) for n in _cache_sizes(log)]
        assert sorted(sizes) == sorted([len(labeled), len(unlabeled)]), f"CacheDataset sizes in the log: {sizes}"

        # --- the new weights are picked up by inference and load without key mismatches
        t = time.monotonic()
        infer_2 = _infer(server, unlabeled[0], tmp_path / "infer_2.nii.gz")
        _check_label(infer_2, studies_dir / f"{unlabeled[0]}.nii.gz", len(names))
        times["infer after training"] = time.monotonic() - t
        log = server.text()
        assert "Reload model from cache" in log
        assert "Checkpoint keys don't match" not in log
        ok = True
    finally:
        server.stop()
        print("MONAI Label timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in times.items()))
        if not ok:
            print(f"---- MONAI Label server log (tail of {server.log}) ----\n{server.tail()}")


def _displayable(bundle: Path) -> list[str]:
    """Ids of the train config's ``displayable_configs`` (MONAI Label reads ``request[id]`` for each of them)."""
    return list(json.loads((bundle / "configs" / "train.json").read_text()).get("displayable_configs", {}))


def _logged_override(log: str, key: str) -> str:
    """The value of ``key`` in the input summary that ``monai.bundle.run`` logs (``> key: value``, may span lines)."""
    m = re.search(rf"> {re.escape(key)}: (.*?)(?=\n\S|\Z)", log, flags=re.S)
    assert m, f"no '> {key}:' in the server log"
    return m.group(1)


def _cache_sizes(log: str) -> list[str]:
    """Totals of MONAI CacheDataset progress bars, in order: one per bar, read from the line tqdm prints when the bar
    starts ("Loading dataset:   0%|...| 0/n"; its last line, "n/n", may be printed twice)."""
    return [m.group(1) for m in re.finditer(r"Loading dataset:\s+0%\|[^|\r\n]*\| 0/(\d+) ", log)]


@pytest.mark.parametrize("studies", ["binary"], indirect=True)
def test_monailabel_answers_concurrent_inference_while_training(studies, tmp_path):
    """LOAD_REQUESTS inference requests at once while a background training runs: every one answered (200) with a
    correct label (the image's grid, class indices, and the very label the image gets alone), the training keeps
    going (or ends DONE), the server still answers after; p50 / p95 latency printed. MONAI Label 0.8.5 runs each
    inference inside its event loop: the requests are served one after the other (docs/monailabel.md)."""
    _label_python()
    source, _, unlabeled, _ = studies
    studies_dir = tmp_path / "studies"  # the test's own datastore: the server writes datastore_v2.json and .lock
    shutil.copytree(source, studies_dir, ignore=shutil.ignore_patterns("datastore_v2.json", ".lock", "original"))
    images = unlabeled[:LOAD_IMAGES]
    app, bundle = _app_with_bundle(tmp_path)
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    num_classes = len(parser["classes"])
    model_pt = bundle / "models" / "model.pt"
    weights = (_sha256(model_pt), model_pt.stat().st_mtime_ns)
    times, report = {}, {}

    def check(case: str, label_file: Path) -> np.ndarray:
        _check_label(label_file, studies_dir / f"{case}.nii.gz", num_classes)
        return np.asarray(nib.load(str(label_file)).dataobj)

    def alone(tag: str) -> dict[str, np.ndarray]:
        """Each image inferred alone (one request at a time): its label, and the latencies in ``times``."""
        labels = {}
        for case in images:
            t = time.monotonic()
            labels[case] = check(case, _infer(server, case, tmp_path / f"{tag}_{case}.nii.gz"))
            times.setdefault(tag, []).append(time.monotonic() - t)
        return labels

    t0 = time.monotonic()
    server = Server(app, studies_dir, tmp_path / "server.log")
    trainers, pool, ok = [], None, False
    try:
        info = server.wait_ready(START_TIMEOUT)
        assert BUNDLE_NAME in info["models"] and BUNDLE_NAME in info["trainers"], info
        reference = alone("alone")  # the first one also loads the model

        # --- a background training, as Slicer's Train button starts it; the load begins once it iterates
        request = _train_request(info, bundle, max_epochs=LOAD_TRAIN_EPOCHS)
        status, body = _request(
            f"{server.url}/train/{BUNDLE_NAME}",
            data=json.dumps(request).encode(),
            headers={"Content-Type": "application/json"},
        )
        assert status == 200, body
        deadline = time.monotonic() + TRAIN_TIMEOUT
        while _train_position(server.text()) is None:
            assert _training_running(server), f"the training ended before its first iteration: {_train_state(server)}"
            assert time.monotonic() < deadline, f"the training logged no iteration within {TRAIN_TIMEOUT} s"
            time.sleep(1)
        trainers = server.children("monailabel.interfaces.utils.app")  # the training process (MONAI Label's child)
        assert len(trainers) == 1, trainers
        position = {"before": _train_position(server.text())}

        # --- the load: LOAD_REQUESTS inferences at once on the datastore's images, then a status request (queued
        # behind them: MONAI Label answers it once they are done)
        cases = [images[i % len(images)] for i in range(LOAD_REQUESTS)]

        def one(i: int) -> float:
            t = time.monotonic()
            _infer(server, cases[i], tmp_path / f"load_{i:02d}.nii.gz", timeout=LOAD_TIMEOUT)
            return time.monotonic() - t

        pool = concurrent.futures.ThreadPoolExecutor(LOAD_WORKERS, thread_name_prefix="load")
        t_load = time.monotonic()
        futures = [pool.submit(one, i) for i in range(LOAD_REQUESTS)]
        time.sleep(1)
        t = time.monotonic()
        running_during = _training_running(server, timeout=LOAD_TIMEOUT)
        report["status request sent 1 s into the load answered after"] = f"{time.monotonic() - t:.1f} s"
        _, pending = concurrent.futures.wait(futures, timeout=max(1.0, LOAD_TIMEOUT - (time.monotonic() - t_load)))
        times["load (all answers)"] = [time.monotonic() - t_load]
        assert not pending, f"{len(pending)} of {LOAD_REQUESTS} requests unanswered after {LOAD_TIMEOUT} s"
        errors = [repr(f.exception()) for f in futures if f.exception() is not None]
        assert not errors, errors  # a non-200 answer raises urllib.error.HTTPError
        times["under load"] = [f.result() for f in futures]
        assert len(times["under load"]) == LOAD_REQUESTS
        assert running_during, "the training was not running during the load"

        # --- the training kept going through the load (or finished it cleanly)
        position["after"] = _train_position(server.text())
        if _training_running(server):
            assert position["after"] > position["before"], f"no training iteration during the load: {position}"
            assert all(_alive(pid) for pid in trainers), trainers
            report["training after the load"] = f"RUNNING, {position}; stopped with DELETE /train/"
            status, body = _request(f"{server.url}/train/", method="DELETE")
            assert status == 200, body
            deadline = time.monotonic() + 60
            while _training_running(server):
                assert time.monotonic() < deadline, "DELETE /train/ did not stop the training within 60 s"
                time.sleep(1)
            assert _train_state(server)["status"] == "STOPPED", _train_state(server)
        else:
            state = _train_state(server)
            report["training after the load"] = f"{state['status']}, {position}"
            assert state["status"] == "DONE", state
        deadline = time.monotonic() + 30  # MONAI Label reports STOPPED as it sends SIGKILL
        while any(_alive(pid) for pid in trainers):
            assert time.monotonic() < deadline, f"the training process outlived its end: {trainers}"
            time.sleep(0.5)

        # --- every answer is the label of its image: the same as alone before the load (deterministic), or, if the
        # training ended during the load and rewrote models/model.pt, the same as alone with the new weights
        trained = {}
        if (_sha256(model_pt), model_pt.stat().st_mtime_ns) != weights:
            trained = alone("alone, trained")
        for i, case in enumerate(cases):
            label = check(case, tmp_path / f"load_{i:02d}.nii.gz")
            same = np.array_equal(label, reference[case]) or (case in trained and np.array_equal(label, trained[case]))
            assert same, f"request {i} ({case}): a label that the image does not get alone"

        # --- the server is alive
        status, body = _request(f"{server.url}/info/")
        assert status == 200 and BUNDLE_NAME in json.loads(body)["models"]
        ok = True
    finally:
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)  # the stopped server fails whatever is still waiting
        server.stop()
        for pid in trainers:  # the training process, by its PID, should it have left the server's group
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        times["total"] = [time.monotonic() - t0]
        print("MONAI Label under load: " + _latencies(times) + "; " + ", ".join(f"{k}: {v}" for k, v in report.items()))
        if not ok:
            print(f"---- MONAI Label server log (tail of {server.log}) ----\n{server.tail()}")
    assert not server.members(), f"processes left by the server: {server.members()}"


def _training_running(server: Server, timeout: float = 30) -> bool:
    """Whether the last training task is SUBMITTED or RUNNING (``GET /train/``; ``?check_if_running=true`` answers 404
    for a moment after the train request, until MONAI Label's task thread has started the training process)."""
    return _train_state(server, timeout)["status"] in ("SUBMITTED", "RUNNING")


def _train_state(server: Server, timeout: float = 30) -> dict:
    """The last training task (``GET /train/``): ``status`` (SUBMITTED, RUNNING, DONE, ERROR, STOPPED), its request
    and its last lines of output (``details``)."""
    return json.loads(_request(f"{server.url}/train/", timeout=timeout)[1])


def _train_position(log: str) -> tuple[int, int] | None:
    """(epoch, iteration) of the training's last logged iteration (ignite's progress bar ``Epoch [e/E]: [i/I]`` and
    MONAI's ``Epoch: e/E, Iter: i/I``), None before the first one."""
    found = re.findall(r"Epoch \[(\d+)/\d+\]: \[(\d+)/\d+\]|Epoch: (\d+)/\d+, Iter: (\d+)/\d+", log)
    positions = [(int(a or c), int(b or d)) for a, b, c, d in found]
    return max(positions) if positions else None


def _alive(pid: int) -> bool:
    state = _processes().get(pid)
    return state is not None and state[2] != "Z"


def _latencies(times: dict[str, list[float]]) -> str:
    """``name p50 / p95 / max`` of each list of seconds (one value: just it)."""
    parts = []
    for name, values in times.items():
        if len(values) == 1:
            parts.append(f"{name} {values[0]:.1f} s")
        else:
            p50, p95 = np.percentile(values, [50, 95])
            parts.append(f"{name} p50 {p50:.1f} s / p95 {p95:.1f} s / max {max(values):.1f} s (n={len(values)})")
    return ", ".join(parts)
