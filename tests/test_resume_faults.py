# Copyright (c) 2026 The CPCL bundle authors
# SPDX-License-Identifier: Apache-2.0
"""Faults of the resume checkpoints: a damaged latest checkpoint (the run resumes from the previous one), a disk
that fills during a write (the run stops with an error, the previous checkpoint intact, no partial file left) and a
kill during a write (the partial file is never loaded, and is removed later)."""

import errno
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine, Events

from cpcl_bundle.errors import InputError
from cpcl_bundle.resume import _PARTIAL, _PATTERN, ResumeCheckpoint, TrainingRNG, latest_checkpoint
from tests.helpers import resumable_trainer
from tests.test_bundle import ROOT

_REAL_TEMPFILE = tempfile.NamedTemporaryFile


class _WriteStops:
    """A file whose writes stop after ``limit`` bytes (those are written and flushed), then call ``action``."""

    def __init__(self, file, limit, action):
        self.file, self.limit, self.action, self.written = file, limit, action, 0

    def write(self, data):
        data = bytes(data)
        if self.written + len(data) > self.limit:
            self.file.write(data[: self.limit - self.written])
            self.file.flush()
            self.written = self.limit
            self.action()
        self.written += len(data)
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)


def stop_writes(monkeypatch_or_none, nth, limit, action, folder=None):
    """From the ``nth`` atomic checkpoint write on (Ignite's ``DiskSaver`` writes into a ``NamedTemporaryFile``) into
    ``folder`` (any folder if ``None``), the write stops after ``limit`` bytes with ``action``."""
    count = [0]

    def named_temporary_file(*args, **kwargs):
        tmp = _REAL_TEMPFILE(*args, **kwargs)
        if folder is not None and Path(kwargs.get("dir") or "").resolve() != Path(folder).resolve():
            return tmp
        count[0] += 1
        if count[0] >= nth:
            tmp.file = _WriteStops(tmp.file, limit, action)
        return tmp

    if monkeypatch_or_none is None:
        tempfile.NamedTemporaryFile = named_temporary_file
    else:
        monkeypatch_or_none.setattr(tempfile, "NamedTemporaryFile", named_temporary_file)


def disk_full():
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def kill_self():
    os.kill(os.getpid(), signal.SIGKILL)


class Blob:
    """A checkpointed object of ``size`` float32 values (to fill a disk)."""

    def __init__(self, size=16):
        self.size, self.value = size, torch.zeros(size)

    def state_dict(self):
        return {"value": torch.arange(float(self.size))}

    def load_state_dict(self, state):
        self.value = state["value"]


class TinyEngine(Engine):
    """An Ignite engine with a ``network`` (what :class:`ResumeCheckpoint` saves) and one SGD step per batch."""

    def __init__(self, folder, resume=False, interval=1, blob=None):
        super().__init__(self._step)
        torch.manual_seed(int(resume))
        self.network = torch.nn.Linear(4, 2)
        self.optimizer = torch.optim.SGD(self.network.parameters(), lr=0.1)
        objects = {"optimizer": self.optimizer, "rng": TrainingRNG(), "blob": blob or Blob()}
        self.handler = ResumeCheckpoint(folder, interval=interval, objects=objects, resume=resume)
        self.handler.attach(self)

    def _step(self, engine, batch):
        self.optimizer.zero_grad()
        loss = self.network(torch.randn(3, 4)).square().mean()
        loss.backward()
        self.optimizer.step()
        return loss.item()

    def go(self, iterations=4):
        return self.run(range(2), max_epochs=iterations // 2)


def _files(folder):
    return sorted(p.name for p in Path(folder).iterdir())


# ---------------------------------------------------------------------------------------------------- damaged latest


def _cpcl_trainer(folder, resume=False, stop_at=None):
    """The single-process exact-resume setting of tests/test_resume.py: tiny CPCL, 6 steps, a checkpoint every 2."""
    return resumable_trainer(folder, 6, resume=resume, stop_at=stop_at)


def _truncate_half(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garbage_head(path):
    data = bytearray(path.read_bytes())
    data[:256] = os.urandom(256)
    path.write_bytes(bytes(data))


def _garbage_in_weights(path):
    """Random bytes in the middle of the file, inside a tensor's data: ``torch.load`` reads such a file without
    complaint (it checks no data), only the checkpoint's digest catches it."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
    path.write_bytes(bytes(data))


def _zero_bytes(path):
    path.write_bytes(b"")


DAMAGES = {
    "truncated to half": (_truncate_half, "unreadable, truncated or corrupt"),
    "garbage header": (_garbage_head, "unreadable, truncated or corrupt"),
    "garbage in the weights": (_garbage_in_weights, "do not match the digest"),
    "zero bytes": (_zero_bytes, "empty file (0 bytes)"),
}


@pytest.fixture(scope="module")
def stopped_at_4(tmp_path_factory):
    """A tiny CPCL run stopped after 4 of 6 steps (checkpoints 2 and 4), and the run resumed from checkpoint 2 with
    checkpoint 4 removed: the uninterrupted run from the previous checkpoint, the reference."""
    folder = tmp_path_factory.mktemp("stopped")
    engine, _ = _cpcl_trainer(folder, stop_at=4)
    engine.run()
    assert _files(folder) == ["resume_checkpoint_2.pt", "resume_checkpoint_4.pt"]  # two kept by default
    reference = tmp_path_factory.mktemp("reference")
    shutil.copy(folder / "resume_checkpoint_2.pt", reference)
    engine, handler = _cpcl_trainer(reference, resume=True)
    engine.run()
    assert handler.loaded_from.name == "resume_checkpoint_2.pt" and engine.state.iteration == 6
    return folder, {k: v.clone() for k, v in engine.network.state_dict().items()}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_latest_checkpoint_is_skipped_and_the_run_resumes_from_the_previous_one(
    damage, stopped_at_4, tmp_path, caplog
):
    source, reference = stopped_at_4
    folder = tmp_path / "checkpoints"
    shutil.copytree(source, folder)
    latest = folder / "resume_checkpoint_4.pt"
    make_damage, cause = DAMAGES[damage]
    make_damage(latest)
    assert latest_checkpoint(folder) == latest  # still the newest name: loading is what finds the damage

    engine, handler = _cpcl_trainer(folder, resume=True)
    loaded = []
    engine.add_event_handler(Events.STARTED, lambda e: loaded.append(e.state.iteration))
    with caplog.at_level(logging.WARNING):
        engine.run()
    assert handler.loaded_from == folder / "resume_checkpoint_2.pt" and loaded == [2]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "skipping" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith(f"resume: skipping {latest}: ")
    assert cause in warnings[0] and "\n" not in warnings[0]
    # bit for bit the run resumed from checkpoint 2 without a checkpoint 4
    final = engine.network.state_dict()
    assert engine.state.iteration == 6 and all(torch.equal(final[k], reference[k]) for k in reference)
    # the damaged file was replaced by the resumed run's own checkpoint 4, then pruned: the last two kept
    assert _files(folder) == ["resume_checkpoint_4.pt", "resume_checkpoint_6.pt"]


def test_no_loadable_checkpoint_is_an_input_error_naming_each_file(tmp_path):
    """Checkpoints exist but none loads: stop, naming them (a silent start from scratch would throw the run away)."""
    TinyEngine(tmp_path, interval=2).go()
    _truncate_half(tmp_path / "resume_checkpoint_4.pt")
    _zero_bytes(tmp_path / "resume_checkpoint_2.pt")
    with pytest.raises(InputError) as info:
        TinyEngine(tmp_path, resume=True, interval=2).go()
    problems = info.value.problems
    assert problems[0].startswith(f"{tmp_path / 'resume_checkpoint_4.pt'}: unreadable, truncated or corrupt (")
    assert problems[1] == f"{tmp_path / 'resume_checkpoint_2.pt'}: empty file (0 bytes)"
    assert problems[2].startswith(f"{tmp_path}: none of its 2 resume checkpoints loads")
    assert all("\n" not in p for p in problems)


def test_checkpoint_that_loads_but_lacks_keys_stays_the_configuration_error(tmp_path):
    torch.save({"model": {}}, tmp_path / "resume_checkpoint_4.pt")
    with pytest.raises(ValueError, match="resume checkpoint lacks .* written by another configuration"):
        TinyEngine(tmp_path, resume=True, interval=2).go()


def test_two_checkpoints_are_kept_including_across_a_resume(tmp_path):
    TinyEngine(tmp_path).go(4)
    assert _files(tmp_path) == ["resume_checkpoint_3.pt", "resume_checkpoint_4.pt"]
    TinyEngine(tmp_path, resume=True).go(8)  # the earlier run's files are pruned too, once newer ones are complete
    assert _files(tmp_path) == ["resume_checkpoint_7.pt", "resume_checkpoint_8.pt"]
    assert ResumeCheckpoint(tmp_path).n_saved == 2


# ---------------------------------------------------------------------------------------------------- disk full


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real 1 MiB tmpfs (needs the right to mount: root with CAP_SYS_ADMIN, as in some containers); skipped
    where mounting is not permitted."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("cannot mount a tmpfs here (no mount command)")
    cmd = ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()})")
    yield mount
    subprocess.run(["umount", str(mount)], check=False, timeout=60)


def _check_disk_full_stop(folder, error):
    message = error.problems[0]
    assert len(error.problems) == 1 and "\n" not in message
    assert message == (
        f"{folder}: no space left on device while writing resume checkpoint resume_checkpoint_3.pt; the previous "
        "checkpoint resume_checkpoint_2.pt is intact, no partial file is left: free space there (or set resume_dir), "
        "then run again with --resume true"
    )
    assert _files(folder) == ["resume_checkpoint_1.pt", "resume_checkpoint_2.pt"]  # no temporary file left
    resumed = TinyEngine(folder, resume=True)
    resumed.go(2)
    assert resumed.handler.loaded_from == folder / "resume_checkpoint_2.pt"


def test_disk_full_during_a_write_on_a_real_tmpfs_stops_with_the_previous_checkpoint_intact(small_tmpfs):
    """A real full disk: a 1 MiB tmpfs holds checkpoints 1 and 2 (about 0.2 MiB each); checkpoint 3 carries 2 MiB and
    its write fails with ENOSPC from the kernel."""
    blob = Blob(50_000)
    engine = TinyEngine(small_tmpfs, blob=blob)
    engine.add_event_handler(Events.ITERATION_COMPLETED(once=2), lambda e: setattr(blob, "size", 500_000))
    with pytest.raises(InputError) as info:
        engine.go(4)
    assert engine.state.iteration == 3
    _check_disk_full_stop(small_tmpfs, info.value)


def test_disk_full_during_a_write_simulated_stops_with_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    """Simulated full disk (runs everywhere): the third checkpoint write raises ``OSError(ENOSPC)`` after 1,000 of
    its bytes are on disk, as a full file system's ``write`` would."""
    stop_writes(monkeypatch, 3, 1000, disk_full)
    engine = TinyEngine(tmp_path)
    with pytest.raises(InputError) as info:
        engine.go(4)
    monkeypatch.undo()
    _check_disk_full_stop(tmp_path, info.value)


# ---------------------------------------------------------------------------------------------------- killed write

_KILLED_WRITER = """
import sys
from tests.test_resume_faults import Blob, TinyEngine, kill_self, stop_writes
stop_writes(None, 2, 1000, kill_self)
TinyEngine(sys.argv[1], interval=2, blob=Blob(100_000)).go()
"""


def test_kill_during_a_write_leaves_no_file_a_resume_would_load(tmp_path, caplog):
    """A process SIGKILLed in the middle of ``torch.save`` of its second checkpoint (from the write itself, after 1,000
    of about 400,000 bytes: no timing involved) leaves checkpoint 2 and a partial temporary file: the partial file's
    name never matches a checkpoint's, the resume loads checkpoint 2 and removes the partial file, logged."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(tmp_path)], cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == -signal.SIGKILL
    partial = [p for p in tmp_path.iterdir() if not _PATTERN.match(p.name)]
    assert len(partial) == 1 and _PARTIAL.fullmatch(partial[0].name) and 0 < partial[0].stat().st_size < 400_000
    assert latest_checkpoint(tmp_path) == tmp_path / "resume_checkpoint_2.pt"

    resumed = TinyEngine(tmp_path, resume=True, interval=2, blob=Blob(100_000))
    with caplog.at_level(logging.WARNING):
        resumed.go()
    assert resumed.handler.loaded_from == tmp_path / "resume_checkpoint_2.pt" and resumed.state.iteration == 4
    assert f"resume: removed {partial[0]}, the partial file of an interrupted checkpoint write" in caplog.messages
    assert _files(tmp_path) == ["resume_checkpoint_2.pt", "resume_checkpoint_4.pt"]


def test_partial_files_of_killed_writes_are_removed_before_the_next_save(tmp_path, caplog):
    stale = tmp_path / "tmpab_c1234"
    stale.write_bytes(b"PK\x03\x04 half a checkpoint")
    assert not _PATTERN.match(stale.name) and latest_checkpoint(tmp_path) is None
    with caplog.at_level(logging.WARNING, logger="cpcl_bundle.resume"):
        TinyEngine(tmp_path, interval=2).go()
    assert f"resume: removed {stale}, the partial file of an interrupted checkpoint write" in caplog.messages
    assert _files(tmp_path) == ["resume_checkpoint_2.pt", "resume_checkpoint_4.pt"]


_FULL_DISK_RUN = """
import runpy, sys
from tests.test_resume_faults import disk_full, stop_writes
stop_writes(None, 2, 100_000, disk_full, folder=sys.argv[1])
sys.argv = ["monai.bundle"] + sys.argv[2:]
runpy.run_module("monai.bundle", run_name="__main__")
"""


@pytest.mark.slow
def test_disk_full_ends_a_command_line_run_with_the_error_as_the_last_line(tiny_dataset, tmp_path):
    """Through the real CLI (``monai.bundle run training``), with the full disk simulated as above at the second
    resume checkpoint (iteration 2): exit status 1, the error the last line printed, both checkpoints' state kept."""
    from tests.test_resume import _cmd

    out = tmp_path / "out"
    folder = out / "checkpoints"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", _FULL_DISK_RUN, str(folder)] + _cmd(tiny_dataset, out)[3:]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stderr.rstrip().splitlines()[-2:] == [
        "error: 1 input problem:",
        f"  {folder}: no space left on device while writing resume checkpoint resume_checkpoint_2.pt; the previous "
        "checkpoint resume_checkpoint_1.pt is intact, no partial file is left: free space there (or set resume_dir), "
        "then run again with --resume true",
    ]
    assert _files(folder) == ["resume_checkpoint_1.pt"]
