# Copyright (c) 2026 The CPCL bundle authors
# SPDX-License-Identifier: Apache-2.0
"""Exact resume: every piece of state a training run depends on, saved atomically and restored.

A run's future depends on the weights (student and teacher), the optimizer and LR scheduler, the engine's
iteration/epoch, where each data stream stands in its shuffled pass, and every random number generator
(torch, numpy, python, and the private generator of each random MONAI transform). :class:`ResumeCheckpoint`
saves all of them every ``interval`` iterations with Ignite's ``Checkpoint`` through an atomic ``DiskSaver``
(temporary file + rename: a kill never leaves a truncated file) and, with ``resume=True``, loads the latest
before the run starts. Exactness needs the data streams to be driven by :class:`ResumableSampler` and data
loading in the main process (``num_workers=0``, the default here): worker processes prefetch batches, so
their position cannot be known exactly. Each DataLoader also needs its own ``generator``: creating an iterator
draws a seed from it, and from the global torch generator otherwise, which would shift every later random
draw of a resumed run (whose iterators are created at other times than in an uninterrupted one).

Faults. The last two checkpoints are kept (``n_saved``), and an older one is deleted only after the newer one is
complete. Each file carries a SHA-256 digest of its contents (``integrity``). On resume, a checkpoint that does not
load (truncated, zero bytes, overwritten with garbage, digest mismatch) is skipped with a one-line warning naming
it and the cause, and the run resumes from the newest one that loads; if checkpoints exist but none loads, the run
stops with an :class:`~cpcl_bundle.errors.InputError` naming each file (never a silent start from scratch). The
temporary file of a write (Ignite's ``tmpXXXXXXXX``) cannot match :func:`latest_checkpoint`'s pattern; one left by a
killed write is removed, with a log line, when the run resumes and before the next save. A write that fails for
want of space (ENOSPC, EDQUOT, EFBIG) removes its temporary file and stops the run with an ``InputError`` naming the
folder, the cause (``no space left on device``) and the previous checkpoint, which stays intact.

Under torchrun (``configs/multi_gpu_train.json``) the resume is exact too. The training streams are driven by
:class:`ResumableDistributedSampler`: every rank shuffles the same pass from ``seed + pass``, padded to a
multiple of the world size as ``DistributedSampler`` pads, and rank ``r`` takes indices ``r::world_size``.
Weights, teacher, optimizer, scheduler and engine state are identical on every rank (DDP), so one file holds
them, written by rank 0 alone (Ignite's ``DiskSaver`` saves on ``save_on_rank=0``); the random state and
sampler positions differ per rank, so :class:`TrainingRNG` with ``distributed=True`` gathers every rank's
(``all_gather_object``) into that same file, which is therefore complete or absent as one atomic file. On
resume every rank loads it and restores its own entry (an error naming the file if the world size differs);
rank 0's choice of checkpoint is broadcast and every rank checks that it sees the same one and, after loading,
that all ranks stand at the same iteration. A single-process run writes and reads exactly the format it did.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import math
import os
import random
import re
from collections.abc import Iterable, Iterator, Sized
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import numpy as np
import torch
import torch.distributed as dist
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, DiskSaver
from monai.transforms import Randomizable
from torch.utils.data import Sampler

from cpcl_bundle.errors import InputError
from cpcl_bundle.validation import as_bool

__all__ = [
    "ResumableSampler",
    "ResumableDistributedSampler",
    "TrainingRNG",
    "ResumeCheckpoint",
    "latest_checkpoint",
    "resume_checkpoints",
]

PREFIX = "resume"
_PATTERN = re.compile(rf"{PREFIX}_checkpoint_(\d+)\.pt$")
#: The temporary file of an atomic write (``tempfile.NamedTemporaryFile`` in Ignite's ``DiskSaver``): ``tmp`` and
#: 8 random characters, never a name :data:`_PATTERN` matches.
_PARTIAL = re.compile(r"tmp[a-z0-9_]{8}")
#: The key of the checkpoint's digest of its own contents.
INTEGRITY = "integrity"
#: Write errors that mean the disk (or the quota, or the file size limit) is full.
_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)

logger = logging.getLogger(__name__)


def _distributed() -> bool:
    """Whether this process is one of several ranks of an initialised process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class ResumableSampler(Sampler[int]):
    """Seeded shuffling sampler whose position in the current pass can be saved and restored.

    Pass ``p`` visits the indices in ``randperm(n)`` of a generator seeded with ``seed + p``; the state is
    (pass, indices already given out), so a restored sampler continues mid-pass exactly where it stood.
    With ``num_replicas`` > 1 each pass is padded to a multiple of ``num_replicas`` by repeating its first
    indices and rank ``rank`` takes indices ``rank::num_replicas`` of it: ``DistributedSampler``'s split
    (``drop_last=False``), whose ``set_epoch(p)`` pass it equals.
    """

    def __init__(
        self, data_source: Sized, shuffle: bool = True, seed: int = 0, num_replicas: int = 1, rank: int = 0
    ) -> None:
        num_replicas, rank = int(num_replicas), int(rank)
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, num_replicas) and num_replicas >= 1, got {rank} of {num_replicas}")
        self.size = len(data_source)
        self.num_replicas, self.rank = num_replicas, rank
        self.n = math.ceil(self.size / num_replicas)  # indices this rank gives out per pass
        self.shuffle, self.seed = bool(shuffle), int(seed)
        self.next_pass = 0  # index of the pass the next fresh iterator starts
        self.current = -1  # pass being given out
        self.position = 0  # indices of the current pass given out so far
        self._pending: tuple[int, int] | None = None

    def _order(self, p: int) -> list[int]:
        if not self.shuffle:
            order = list(range(self.size))
        else:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + p)).tolist()
        total = self.n * self.num_replicas
        if total > len(order):  # pad as DistributedSampler does: repeat the pass from its start
            order += (order * math.ceil((total - len(order)) / len(order)))[: total - len(order)]
        return order[self.rank : total : self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        if self._pending is not None and self._pending[1] < self.n:
            p, start = self._pending
        else:
            p, start = self.next_pass, 0
            self.next_pass += 1
        self._pending = None
        self.current, self.position = p, start
        for index in self._order(p)[start:]:
            self.position += 1
            yield index

    def __len__(self) -> int:
        return self.n

    def state_dict(self) -> dict[str, int]:
        state = {"next_pass": self.next_pass, "current": self.current, "position": self.position}
        if self.num_replicas > 1:  # single-process state keeps its format
            state["num_replicas"] = self.num_replicas
        return state

    def load_state_dict(self, state: dict[str, int]) -> None:
        if int(state.get("num_replicas", 1)) != self.num_replicas:
            raise ValueError(
                f"the sampler state was saved with {state.get('num_replicas', 1)} replicas, this sampler has "
                f"{self.num_replicas}: resume with the same number of processes"
            )
        self.next_pass, self.current, self.position = (int(state[k]) for k in ("next_pass", "current", "position"))
        self._pending = (self.current, self.position) if self.current >= 0 else None


class ResumableDistributedSampler(ResumableSampler):
    """:class:`ResumableSampler` split across the ranks of the process group (torchrun), ``DistributedSampler``'s
    drop-in for the training streams: ``num_replicas`` and ``rank`` default to the process group's."""

    def __init__(
        self,
        data_source: Sized,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        if num_replicas is None or rank is None:
            if not (dist.is_available() and dist.is_initialized()):
                raise RuntimeError(
                    "ResumableDistributedSampler: no initialised process group (torch.distributed.init_process_group, "
                    "run under torchrun): pass num_replicas and rank, or initialise the group first"
                )
            num_replicas = dist.get_world_size() if num_replicas is None else num_replicas
            rank = dist.get_rank() if rank is None else rank
        super().__init__(data_source, shuffle=shuffle, seed=seed, num_replicas=num_replicas, rank=rank)


def _randomizables(roots: Iterable[Any], depth: int = 3) -> list[Randomizable]:
    """Every random MONAI transform reachable from ``roots`` (Compose lists and their members' attributes),
    in a fixed order, each once."""
    found: list[Randomizable] = []
    seen: set[int] = set()

    def visit(obj: Any, level: int) -> None:
        if obj is None or id(obj) in seen or level > depth:
            return
        if isinstance(obj, (list, tuple)):
            for item in obj:
                visit(item, level)
            return
        if not hasattr(obj, "__dict__") or isinstance(obj, (torch.Tensor, np.ndarray)):
            return
        seen.add(id(obj))
        if isinstance(obj, Randomizable):
            found.append(obj)
        for value in vars(obj).values():
            if isinstance(value, (list, tuple)) or hasattr(value, "__dict__"):
                visit(value, level + 1)

    for root in roots:
        visit(root, 0)
    return found


def _numpy_state(state: tuple) -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = state
    return {
        "name": name,
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached": float(cached),
    }


def _numpy_tuple(state: dict[str, Any]) -> tuple:
    return (state["name"], state["keys"].numpy().astype(np.uint32), state["pos"], state["has_gauss"], state["cached"])


class TrainingRNG:
    """Every random source of a run as one checkpointable object (``state_dict`` / ``load_state_dict``).

    Args:
        transforms: Compose objects (or lists) whose random transforms' private generators are saved.
        samplers: samplers with ``state_dict`` (e.g. :class:`ResumableSampler`); one without (a plain
            ``DistributedSampler``) is an error, as its stream could not be resumed exactly.
        distributed: under torchrun: ``state_dict`` gathers every rank's state (a collective: every rank calls
            it, as Ignite's ``Checkpoint`` does) as ``{"world_size": W, "ranks": [state of rank 0, ...]}`` and
            ``load_state_dict`` restores this rank's entry. ``False``: the single-process state, unchanged.
    """

    def __init__(self, transforms: Iterable[Any] = (), samplers: Iterable[Any] = (), distributed: bool = False) -> None:
        self.transforms = _randomizables(transforms)
        self.samplers = list(samplers)
        stateless = [
            type(s).__name__ for s in self.samplers if not (hasattr(s, "state_dict") and hasattr(s, "load_state_dict"))
        ]
        if stateless:
            raise TypeError(
                f"TrainingRNG: samplers {stateless} have no state_dict/load_state_dict, so a resumed run could not "
                "continue their pass: use cpcl_bundle.resume.ResumableSampler (ResumableDistributedSampler under torchrun)"
            )
        self.distributed = as_bool(distributed, "distributed")

    def _local_state(self) -> dict[str, Any]:
        version, internal, gauss = random.getstate()
        return {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": _numpy_state(np.random.get_state()),
            "python": {"version": version, "internal": list(internal), "gauss": gauss},
            "transforms": [_numpy_state(t.R.get_state()) for t in self.transforms],
            "samplers": [s.state_dict() for s in self.samplers],
        }

    def state_dict(self) -> dict[str, Any]:
        if not self.distributed:
            return self._local_state()
        if not dist.is_initialized():  # torchrun with one process and no group: a world of one
            return {"world_size": 1, "ranks": [self._local_state()]}
        ranks: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, self._local_state())
        return {"world_size": len(ranks), "ranks": ranks}

    def rank_state(self, state: dict[str, Any]) -> dict[str, Any]:
        """This process's entry of a saved ``state``; ``ValueError`` naming the cause if it is not this run's kind."""
        saved = state.get("world_size") if isinstance(state, dict) else None
        if not self.distributed:
            if saved is not None:
                raise ValueError(
                    f"the random state was saved by {saved} processes under torchrun, this run is a single process: "
                    f"resume with torchrun --nproc_per_node {saved} and configs/multi_gpu_train.json"
                )
            return state
        world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
        if saved is None:
            raise ValueError(
                f"the random state was saved by a single-process run, this run has {world} processes: "
                "resume it without torchrun"
            )
        if int(saved) != world or len(state["ranks"]) != world:
            raise ValueError(
                f"the random state was saved by {saved} processes, this run has {world}: "
                f"resume with torchrun --nproc_per_node {saved} (the same world size)"
            )
        return state["ranks"][rank]

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = self.rank_state(state)
        if len(state["transforms"]) != len(self.transforms) or len(state["samplers"]) != len(self.samplers):
            raise ValueError(
                f"the checkpoint's random state has {len(state['transforms'])} transforms and "
                f"{len(state['samplers'])} samplers, this run {len(self.transforms)} and {len(self.samplers)}: "
                "resume with the same configuration"
            )
        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        np.random.set_state(_numpy_tuple(state["numpy"]))
        python = state["python"]
        random.setstate((python["version"], tuple(python["internal"]), python["gauss"]))
        for transform, s in zip(self.transforms, state["transforms"]):
            transform.R.set_state(_numpy_tuple(s))
        for sampler, s in zip(self.samplers, state["samplers"]):
            sampler.load_state_dict(s)


def resume_checkpoints(save_dir: str | os.PathLike) -> list[Path]:
    """The resume checkpoints of ``save_dir``, highest iteration first (temporary files of writes never match)."""
    folder = Path(save_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _PATTERN.match(p.name)) and p.is_file()]
    return [p for _, p in sorted(found, reverse=True)]


def latest_checkpoint(save_dir: str | os.PathLike) -> Path | None:
    """The resume checkpoint of the highest iteration in ``save_dir`` (``None`` if there is none)."""
    found = resume_checkpoints(save_dir)
    return found[0] if found else None


def _iteration(path: Path) -> int:
    return int(_PATTERN.match(path.name).group(1))


def remove_partial_files(save_dir: str | os.PathLike, log: logging.Logger = logger) -> list[Path]:
    """Remove the temporary files that killed or failed writes left in ``save_dir``, logging each; returns those
    that could not be removed."""
    folder, left = Path(save_dir), []
    if not folder.is_dir():
        return left
    for path in sorted(folder.iterdir()):
        if _PARTIAL.fullmatch(path.name) and path.is_file():
            try:
                path.unlink(missing_ok=True)
                log.warning(f"resume: removed {path}, the partial file of an interrupted checkpoint write")
            except OSError as e:
                left.append(path)
                log.warning(f"resume: cannot remove the partial file {path} ({e.strerror})")
    return left


def _digest(state: Any) -> str:
    """SHA-256 of a checkpoint's contents: every tensor's bytes, dtype and shape, every plain value and every key,
    in order (``torch.load`` does not check the data it reads: bytes overwritten inside a tensor load silently)."""
    h = hashlib.sha256()

    def visit(obj: Any) -> None:
        if isinstance(obj, torch.Tensor):
            t = obj.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(obj, dict):
            h.update(f"D{len(obj)}".encode())
            for key, value in obj.items():
                h.update(repr(key).encode())
                visit(value)
        elif isinstance(obj, (list, tuple)):
            h.update(f"L{len(obj)}".encode())
            for value in obj:
                visit(value)
        elif obj is None or isinstance(obj, (bool, int, float, complex, str, bytes, torch.dtype, torch.device)):
            h.update(f"{type(obj).__name__}:{obj!r}".encode())
        else:  # a value whose repr may differ between runs (an address): its type only
            h.update(type(obj).__name__.encode())

    visit(state)
    return h.hexdigest()


def _cause(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:200]}" if lines else type(e).__name__


def _read(path: Path) -> dict[str, Any]:
    """Load a resume checkpoint and check its digest; raise ``ValueError`` naming the cause if it is damaged."""
    if path.stat().st_size == 0:
        raise ValueError("empty file (0 bytes)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, garbage: zip, pickle, seek or decode errors
        raise ValueError(f"unreadable, truncated or corrupt ({_cause(e)})") from e
    if not isinstance(checkpoint, dict):
        raise ValueError(f"not a resume checkpoint (a {type(checkpoint).__name__})")
    if INTEGRITY in checkpoint:  # checkpoints of 0.7.0 and before have none
        stored = checkpoint.pop(INTEGRITY)
        if _digest(checkpoint) != stored:
            raise ValueError("corrupt: its contents do not match the digest written with them")
    return checkpoint


def _disk_full(e: BaseException) -> OSError | None:
    """The ENOSPC/EDQUOT/EFBIG ``OSError`` in ``e``'s chain (``torch.save`` reports it as the context of a
    ``RuntimeError``)."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError) and e.errno in _FULL:
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


class _ResumeSaver(DiskSaver):
    """Ignite's atomic ``DiskSaver`` with the fault handling of resume checkpoints.

    Before each save, partial files of killed writes are removed; each file gets its digest (:data:`INTEGRITY`).
    Ignite's ``Checkpoint`` deletes the oldest file *before* writing the next one (with ``n_saved`` 1, a kill
    during that write would leave no checkpoint at all): here ``remove`` does nothing and the files beyond the newest
    ``n_saved`` older than the one just written are deleted only once it is complete, including those of earlier
    runs that were resumed. A write that fails for want of space ends the run with an :class:`InputError`.
    """

    def __init__(self, dirname: str | os.PathLike, n_saved: int | None, **kwargs: Any) -> None:
        super().__init__(dirname, **kwargs)
        self.n_saved = n_saved

    def __call__(self, checkpoint: Any, filename: str, metadata: Any = None) -> None:
        if self.save_on_rank != idist.get_rank():
            return
        remove_partial_files(self.dirname)
        if isinstance(checkpoint, dict):
            checkpoint = {**checkpoint, INTEGRITY: _digest(checkpoint)}
        try:
            super().__call__(checkpoint, filename, metadata)
        except BaseException as e:
            # Ignite removes its temporary file, except when closing it fails (the last buffered bytes do not fit)
            left = remove_partial_files(self.dirname)
            full = _disk_full(e)
            if full is None:
                raise
            raise InputError(self._full_message(filename, full, left)) from e
        self._prune(filename)

    def _full_message(self, filename: str, e: OSError, left: list[Path]) -> str:
        kept = [p for p in resume_checkpoints(self.dirname) if p.name != filename]
        previous = f"the previous checkpoint {kept[0].name} is intact" if kept else "no earlier checkpoint exists"
        partial = f"the partial file {left[0].name} could not be removed" if left else "no partial file is left"
        return (
            f"{self.dirname}: {os.strerror(e.errno).lower()} while writing resume checkpoint {filename}; {previous}, "
            f"{partial}: free space there (or set resume_dir), then run again with --resume true"
        )

    def remove(self, filename: str) -> None:
        """Nothing: older checkpoints are deleted by :meth:`_prune`, once the newer file is complete."""

    def _prune(self, filename: str) -> None:
        match = _PATTERN.match(filename)
        if self.n_saved is None or match is None:
            return
        written = int(match.group(1))
        older = [p for p in resume_checkpoints(self.dirname) if _iteration(p) < written]
        for path in older[max(int(self.n_saved) - 1, 0) :]:
            path.unlink(missing_ok=True)


class ResumeCheckpoint:
    """Saves the whole training state every ``interval`` iterations and, with ``resume``, restores the latest.

    Saved: the trainer's network (``model``), its teacher, its ``GradScaler`` (fp16 only), the state of its loss terms that have one
    (``term_<name>``), the engine state (``trainer``) and ``objects``
    (optimizer, LR scheduler, :class:`TrainingRNG`, ...). Files: ``<save_dir>/resume_checkpoint_<iteration>.pt``,
    the last ``n_saved`` kept (the older deleted once the newer is complete); written atomically, with a digest. On
    resume, damaged checkpoints are skipped with a warning (see the module's "Faults"). A handler, not config
    wiring, because the trainer it saves is the engine it is attached to (a config cannot refer to the trainer from
    the trainer's own handlers).

    Args:
        save_dir: folder of the checkpoints.
        interval: iterations between two saves (also saved when the run completes).
        objects: further objects with ``state_dict``/``load_state_dict``.
        resume: load the latest checkpoint of ``save_dir`` that loads (if any) when the run starts.
        n_saved: checkpoints kept: 2, so that a damaged latest one leaves one to resume from.
    """

    def __init__(
        self,
        save_dir: str | os.PathLike,
        interval: int = 50,
        objects: dict[str, Any] | None = None,
        resume: bool = False,
        n_saved: int = 2,
    ) -> None:
        if interval < 1:
            raise ValueError(f"interval must be at least 1, got {interval}")
        self.save_dir, self.interval, self.n_saved = Path(save_dir), int(interval), n_saved
        self.resume = as_bool(resume, "resume")
        self.objects = dict(objects or {})
        self.loaded_from: Path | None = None

    def _to_save(self, engine: Engine) -> dict[str, Any]:
        to_save = {"model": engine.network, "trainer": engine, **self.objects}
        if getattr(engine, "teacher", None) is not None:
            to_save["teacher"] = engine.teacher
        if getattr(engine, "scaler", None) is not None:  # fp16 mixed precision: the loss scale and its counters
            to_save["scaler"] = engine.scaler
        for term in getattr(engine, "terms", ()):  # terms with modules or optimisers of their own (DAN)
            if term.has_state:
                to_save[f"term_{term.name}"] = term
        return to_save

    def _agree(self, engine: Engine) -> None:
        """Before loading, under torchrun: every rank must resume from the checkpoint rank 0 chooses (rank 0's
        choice is broadcast and compared: one folder on a shared file system)."""
        if not _distributed():
            return
        path = latest_checkpoint(self.save_dir)
        chosen = [path.name if path is not None else None]
        dist.broadcast_object_list(chosen, src=0)
        if chosen[0] != (path.name if path is not None else None):
            raise RuntimeError(
                f"{self.save_dir}: rank {dist.get_rank()} finds {path.name if path else 'no checkpoint'}, rank 0 "
                f"{chosen[0] or 'none'}: every rank must resume from one folder on a shared file system"
            )

    def _agreed(self, engine: Engine) -> None:
        """After loading, under torchrun: every rank resumed from the same checkpoint, at the same iteration."""
        if not _distributed():
            return
        mine = (self.loaded_from.name if self.loaded_from is not None else None, engine.state.iteration)
        everyone: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        if len(set(everyone)) > 1:
            raise RuntimeError(
                f"{self.save_dir}: the ranks resumed from different checkpoints (file, iteration): {everyone}"
            )

    def attach(self, engine: Engine) -> None:
        to_save = self._to_save(engine)
        saver = Checkpoint(
            to_save,
            _ResumeSaver(str(self.save_dir), self.n_saved, require_empty=False, atomic=True, create_dir=True),
            filename_prefix=PREFIX,
            n_saved=self.n_saved,
            global_step_transform=lambda e, _: e.state.iteration,
        )
        engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.interval), saver)
        engine.add_event_handler(Events.COMPLETED, saver)
        if self.resume:
            engine.add_event_handler(Events.STARTED, self._agree)
            engine.add_event_handler(Events.STARTED, self._load, to_save)
            engine.add_event_handler(Events.STARTED, self._agreed)

    def _load(self, engine: Engine, to_save: dict[str, Any]) -> None:
        if idist.get_rank() == 0:
            remove_partial_files(self.save_dir, engine.logger)
        paths = resume_checkpoints(self.save_dir)
        if not paths:
            engine.logger.info(f"resume: no checkpoint in {self.save_dir}, starting from scratch")
            return
        damaged = []
        for path in paths:
            try:
                checkpoint = _read(path)
            except (OSError, ValueError) as e:
                cause = e.strerror if isinstance(e, OSError) else str(e)
                damaged.append(f"{path}: {cause}")
                engine.logger.warning(f"resume: skipping {path}: {cause}")
                continue
            break
        else:
            raise InputError(
                damaged
                + [
                    f"{self.save_dir}: none of its {len(paths)} resume checkpoints loads: restore one, or move them "
                    "away to train from scratch"
                ]
            )
        missing = sorted(set(to_save) - set(checkpoint))
        if missing:
            raise ValueError(f"{path}: resume checkpoint lacks {missing}: written by another configuration")
        max_epochs = engine.state.max_epochs
        try:  # a random state of another world size (TrainingRNG.rank_state), another sampler count, ...
            Checkpoint.load_objects(to_load=to_save, checkpoint=checkpoint)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None
        engine.state.max_epochs = max_epochs  # the run's own length wins over the checkpoint's
        self.loaded_from = path
        engine.logger.info(f"resumed from {path} at iteration {engine.state.iteration}, epoch {engine.state.epoch}")
