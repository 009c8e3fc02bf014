# Copyright (c) 2026 The CPCL bundle authors
# SPDX-License-Identifier: Apache-2.0
"""Cost of one training step of every method (Table I's baselines, CPCL, the released code's CPCL), and of CPCL
with the naive prototype computation, in fp32, in mixed precision, or both.

    python scripts/bench_step.py --patch 48 --amp both              # fp32 and bf16 (a CPU with bf16) side by side
    python scripts/bench_step.py --patch 64 --steps 5 --amp false    # fp32 only (default: amp, as train.json)
    python scripts/bench_step.py --device cuda --amp true --patch 112 112 80

Each variant runs in its own process (so the peak memory is its own): ``configs/train.json``'s ``network_def``,
``optimizer`` and ``loss`` (built by :mod:`cpcl_tools.train_objects`), batch 2 labeled + 2 unlabeled, random inputs
with a cube label, the trainer's ``amp`` (:mod:`cpcl_bundle.precision`: bf16
autocast on a CPU or GPU that has it, fp16 on an older GPU, fp32 on a CPU without bf16) and, on CUDA,
``cudnn.benchmark`` as ``configs/train.json`` sets it. With ``--amp both`` each variant runs in fp32 and then in
mixed precision, back to back, so their ratio is measured under the same load. Printed: median step time, peak
memory (CPU: peak RSS of the process; CUDA: peak allocated), ratio to MT. The prototype operations (both
losses, forward + backward, at the step's shapes; always fp32, as in training) are timed on their own, ours
against the naive upsample-then-compute. ``--patch`` takes one size (a cube) or three.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import fire
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from cpcl_bundle import losses  # noqa: E402
from cpcl_bundle.validation import as_bool  # noqa: E402
from cpcl_tools import train_objects  # noqa: E402

_MODES = {1: "linear", 2: "bilinear", 3: "trilinear"}


def naive_masked_average_prototypes(features, labels, num_classes, weights=None):
    """The literal definition: upsample F to the label grid, then masked means (what the naive code does)."""
    up = F.interpolate(features, size=labels.shape[2:], mode=_MODES[features.ndim - 2], align_corners=False)
    mask = F.one_hot(labels[:, 0].long(), num_classes).movedim(-1, 1).to(up.dtype)
    if weights is not None:
        mask = mask * weights
    count = mask.flatten(2).sum(-1)
    per_image = torch.einsum("bcx,bkx->bkc", up.flatten(2), mask.flatten(2)) / count.clamp_min(1e-12).unsqueeze(-1)
    present_bk = count > 0
    n = present_bk.sum(0)
    protos = (per_image * present_bk.unsqueeze(-1)).sum(0) / n.clamp_min(1).unsqueeze(-1)
    return protos, n > 0


def naive_prototype_logits(features, prototypes, size, scale=20.0, eps=1e-12):
    """The literal definition: upsample F, normalise, einsum with the normalised prototypes."""
    up = F.interpolate(features, size=tuple(size), mode=_MODES[features.ndim - 2], align_corners=False)
    return scale * torch.einsum("bc...,kc->bk...", F.normalize(up, dim=1, eps=eps), F.normalize(prototypes, dim=1))


@contextlib.contextmanager
def _naive_prototypes(on: bool = True) -> Iterator[None]:
    """The losses computed with the literal upsample-then-compute prototypes while the context is open."""
    saved = losses.masked_average_prototypes, losses.prototype_logits
    if on:
        losses.masked_average_prototypes, losses.prototype_logits = (
            naive_masked_average_prototypes,
            naive_prototype_logits,
        )
    try:
        yield
    finally:
        losses.masked_average_prototypes, losses.prototype_logits = saved


def _peak_memory_gb(device: torch.device, isolated: bool = True) -> float | None:
    """CUDA: the most allocated since the last reset; CPU: the process's peak RSS, which is one variant's only in
    a process of its own (else ``None``)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6 if isolated else None  # kB on Linux


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def patch_size(patch: Any) -> tuple[int, int, int]:
    """``48`` -> ``(48, 48, 48)``; ``[112, 112, 80]`` or ``"112,112,80"`` -> ``(112, 112, 80)``."""
    if isinstance(patch, str):
        patch = [int(v) for v in patch.replace(",", " ").replace("[", " ").replace("]", " ").split()]
    sizes = [int(v) for v in (patch if isinstance(patch, (list, tuple)) else [patch])]
    if len(sizes) == 1:
        sizes *= 3
    if len(sizes) != 3 or min(sizes) < 32 or any(v % 16 for v in sizes):
        raise ValueError(
            f"--patch: one size or three, multiples of 16 from 32 (the U-Net pools 4 times; instance norm needs more"
            f" than one voxel at the bottleneck), got {patch}"
        )
    return sizes[0], sizes[1], sizes[2]


def _patch_name(size: tuple[int, int, int]) -> str:
    return f"{size[0]}^3" if len(set(size)) == 1 else "x".join(map(str, size))


def _data(n: int, size: tuple[int, int, int], with_label: bool = True) -> list[dict]:
    items = []
    for i in range(n):
        label = torch.zeros(1, *size)
        a, b, c = (v // 4 for v in size)
        label[:, a : 3 * a, b : 3 * b, c + i % 2 : 3 * c] = 1
        image = torch.randn(1, *size) + label
        items.append({"image": image, "label": label} if with_label else {"image": image})
    return items


def one(**kwargs: Any) -> None:
    """Time one variant in this process (the arguments of :func:`measure`); prints one JSON line."""
    print(json.dumps(measure(**kwargs)))


def measure(
    variant: str = "cpcl",
    patch: Any = 64,
    steps: int = 5,
    warmup: int = 2,
    device: str = "cpu",
    amp: bool = True,
    features: Any = None,
    isolated: bool = True,
) -> dict:
    """Median step time and peak memory of one variant (``isolated``: the only one this process measures)."""
    from ignite.engine import Events
    from torch.utils.data import DataLoader

    from cpcl_bundle.precision import describe
    from cpcl_bundle.trainer import CPCLTrainer

    dev = torch.device(device)
    size = patch_size(patch)
    torch.backends.cudnn.benchmark = True  # fixed crops, as configs/train.json sets it (no effect on a CPU)
    torch.manual_seed(0)
    method = "cpcl" if variant == "cpcl_naive" else variant
    net = train_objects.network_def(**({} if features is None else {"features": [int(f) for f in features]})).to(dev)
    opt = train_objects.optimizer(net)
    labeled = DataLoader(_data(2, size), batch_size=2)
    unlabeled = DataLoader(_data(2, size, with_label=False), batch_size=2)
    trainer = CPCLTrainer(
        dev,
        warmup + steps,
        labeled,
        net,
        opt,
        train_objects.loss(),
        unlabeled_data_loader=unlabeled,
        method=method,
        decollate=False,
        amp=as_bool(amp, "amp"),
    )
    times: list[float] = []
    start = {}

    @trainer.on(Events.ITERATION_STARTED)
    def _start(_):
        _sync(dev)
        start["t"] = time.perf_counter()

    @trainer.on(Events.ITERATION_COMPLETED)
    def _stop(_):
        _sync(dev)
        times.append(time.perf_counter() - start["t"])

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    with _naive_prototypes(variant == "cpcl_naive"):
        trainer.run()
    return {
        "variant": variant,
        "patch": list(size),
        "precision": describe(trainer.amp_dtype),
        "median_s": statistics.median(times[warmup:]),
        "peak_gb": _peak_memory_gb(dev, isolated),
        "steps": steps,
    }


def prototypes(**kwargs: Any) -> None:
    """The prototype operations alone (the arguments of :func:`measure_prototypes`); prints one JSON line."""
    print(json.dumps(measure_prototypes(**kwargs)))


def measure_prototypes(
    patch: Any = 64, repeats: int = 3, naive: bool = False, device: str = "cpu", isolated: bool = True
) -> dict:
    """Forward + backward of L_fpc and L_bpc alone at a CPCL step's shapes (256 channels at patch/16)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    torch.manual_seed(0)
    size = patch_size(patch)
    s = [v // 16 for v in size]
    f_l = torch.randn(2, 256, *s, device=dev, requires_grad=True)
    f_u = torch.randn(2, 256, *s, device=dev)
    y_l = torch.zeros(2, 1, *size, device=dev)
    y_l[:, :, size[0] // 4 : size[0] // 2] = 1
    p_u = torch.softmax(torch.randn(2, 2, *size, device=dev), 1)
    times = []
    with _naive_prototypes(naive):
        for _ in range(repeats + 1):
            _sync(dev)
            t = time.perf_counter()
            fpc, _ = losses.forward_prototype_loss(f_l, y_l, f_u, p_u)
            bpc, _ = losses.backward_prototype_loss(f_l, y_l, f_u, p_u)
            (fpc + 10 * bpc).backward()
            _sync(dev)
            times.append(time.perf_counter() - t)
    return {
        "variant": "prototypes_naive" if naive else "prototypes",
        "patch": list(size),
        "precision": "fp32",
        "median_s": statistics.median(times[1:]),
        "peak_gb": _peak_memory_gb(dev, isolated),
        "steps": repeats,
    }


def _child(args: list[str]) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


#: Every method of the paper's Table I, CPCL as the released code runs it, and CPCL with naive prototypes.
DEFAULT_VARIANTS = "supervised,mt,uamt,entropy_min,ict,dan,dtml,cpcl,cpcl_released,cpcl_naive"


def _amp_modes(amp: Any) -> list[bool]:
    if str(amp).lower() == "both":
        return [False, True]
    return [as_bool(amp, "amp")]


def main(
    patch: Any = 64,
    steps: int = 5,
    warmup: int = 2,
    device: str = "cpu",
    variants: str = DEFAULT_VARIANTS,
    amp: Any = True,
    features: Any = None,
    isolate: Any = None,
    output: str | None = None,
) -> None:
    """Time every variant (a method of ``cpcl_bundle.methods.METHODS``, or ``cpcl_naive``) and print the table
    (markdown); ``amp``: ``true`` (the device's mixed precision, as ``configs/train.json``), ``false`` (fp32) or
    ``both``; ``features``: the U-Net's channels (default ``network_def``'s, the paper's 16-256; smaller for a quick check
    of the code paths); ``isolate``: each variant in a process of its own (default on a CPU, where a process's peak RSS
    is the only peak there is; on CUDA the peak is reset per variant and one process saves the start-ups);
    ``output`` also saves JSON."""
    names = [v.strip() for v in (variants.split(",") if isinstance(variants, str) else variants)]
    size, modes = patch_size(patch), _amp_modes(amp)
    isolated = torch.device(device).type == "cpu" if isolate is None else as_bool(isolate, "isolate")
    shape = ",".join(map(str, size))
    rows = []
    for name in names:
        for mode in modes:
            print(f"[bench_step] {name} at {_patch_name(size)}, amp {mode} ...", file=sys.stderr, flush=True)
            if not isolated:
                rows.append(measure(name, size, steps, warmup, device, mode, features, isolated=False))
                continue
            args = [f"--variant={name}", f"--patch=[{shape}]", f"--steps={steps}", f"--warmup={warmup}"]
            args += [] if features is None else [f"--features=[{','.join(str(int(f)) for f in features)}]"]
            rows.append(_child(["one", *args, f"--device={device}", f"--amp={mode}"]))
    for naive in (False, True):
        print(f"[bench_step] prototype operations{' (naive)' if naive else ''} ...", file=sys.stderr, flush=True)
        if not isolated:
            rows.append(measure_prototypes(size, naive=naive, device=device, isolated=False))
            continue
        rows.append(_child(["prototypes", f"--patch=[{shape}]", f"--naive={naive}", f"--device={device}"]))
    print(table(rows, steps, warmup, device))
    if output:
        with open(output, "w") as f:
            json.dump(rows, f, indent=2)


def _gb(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def table(rows: list[dict], steps: int, warmup: int, device: str) -> str:
    """The markdown table of :func:`main`'s rows: one row per variant, one column group per precision measured
    (its step time, peak memory and ratio to MT in that precision), and mixed / fp32 where both were measured."""
    steps_rows = [r for r in rows if not r["variant"].startswith("prototypes")]
    precisions = list(dict.fromkeys(r["precision"] for r in steps_rows))
    by = {(r["variant"], r["precision"]): r for r in steps_rows}
    size = tuple(rows[0]["patch"])
    lines = [
        f"\nOne training step, batch 2 labeled + 2 unlabeled, {_patch_name(size)}, {device}, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads; median of {steps} steps after {warmup} warm-up; "
        f"peak = {'max allocated' if device.startswith('cuda') else 'peak RSS of the process'}\n"
    ]
    header = ["variant"]
    for p in precisions:
        header += [f"{p} step (s)", f"{p} peak (GB)", f"{p} time / MT"]
    mixed = [p for p in precisions if p != "fp32"]
    if "fp32" in precisions and mixed:
        header.append(f"{mixed[0]} / fp32")
    header.append("share of CPCL step")
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for variant in dict.fromkeys(r["variant"] for r in rows):
        cells = [variant]
        if variant.startswith("prototypes"):  # fp32 always: in the first column group, then the share
            proto, cpcl = next(x for x in rows if x["variant"] == variant), by.get(("cpcl", precisions[-1]))
            cells += [f"{proto['median_s']:.3f}", _gb(proto["peak_gb"]), "-"]
            cells += [""] * (len(header) - len(cells) - 1)
            share = f"{100 * proto['median_s'] / cpcl['median_s']:.1f} % (of {precisions[-1]})" if cpcl else ""
            lines.append("| " + " | ".join([*cells, share]) + " |")
            continue
        for p in precisions:
            r, mt = by.get((variant, p)), by.get(("mt", p))
            if r is None:
                cells += ["", "", ""]
                continue
            ratio = f"{r['median_s'] / mt['median_s']:.2f}" if mt else "-"
            cells += [f"{r['median_s']:.3f}", _gb(r["peak_gb"]), ratio]
        if "fp32" in precisions and mixed:
            a, b = by.get((variant, "fp32")), by.get((variant, mixed[0]))
            cells.append(f"**{b['median_s'] / a['median_s']:.2f}**" if a and b else "")
        lines.append("| " + " | ".join([*cells, ""]) + " |")
    return "\n".join(lines)


def patch_argv(argv: list[str]) -> list[str]:
    """``--patch 112 112 80`` (three words on the command line) -> ``--patch=[112,112,80]`` for fire."""
    out = list(argv)
    if "--patch" in out:
        i = j = out.index("--patch")
        while j + 1 < len(out) and out[j + 1].isdigit():
            j += 1
        if j - i > 1:
            out[i : j + 1] = [f"--patch=[{','.join(out[i + 1 : j + 1])}]"]
    return out


if __name__ == "__main__":
    commands = {"main": main, "one": one, "prototypes": prototypes}
    argv = patch_argv(sys.argv[1:])
    fire.Fire(commands if argv and argv[0] in commands else main, command=argv)
