# Copyright (c) 2026 The CPCL bundle authors
# SPDX-License-Identifier: Apache-2.0
"""Cost of one training step of every method (Table I's baselines, CPCL, the released code's CPCL), and of CPCL
with the naive prototype computation.

    python scripts/bench_step.py --patch 64 --steps 5
    python scripts/bench_step.py --patch 96 --steps 3 --device cuda

Each variant runs in its own process (so the peak memory is its own): the paper's U-Net, batch 2 labeled
+ 2 unlabeled, SGD, random inputs with a cube label. Printed: median step time, peak memory (CPU: peak
RSS of the process; CUDA: peak allocated), ratio to MT. The prototype operations (both losses, forward +
backward, at the step's shapes) are timed on their own, ours against the naive upsample-then-compute.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time

import fire
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from cpcl_bundle import losses  # noqa: E402

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


def _use_naive_prototypes() -> None:
    losses.masked_average_prototypes = naive_masked_average_prototypes
    losses.prototype_logits = naive_prototype_logits


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _data(n: int, patch: int, with_label: bool = True) -> list[dict]:
    items = []
    for i in range(n):
        label = torch.zeros(1, patch, patch, patch)
        q = patch // 4
        label[:, q : 3 * q, q : 3 * q, q + i % 2 : 3 * q] = 1
        image = torch.randn(1, patch, patch, patch) + label
        items.append({"image": image, "label": label} if with_label else {"image": image})
    return items


def one(variant: str = "cpcl", patch: int = 64, steps: int = 5, warmup: int = 2, device: str = "cpu") -> None:
    """Time one variant in this process; prints one JSON line."""
    from ignite.engine import Events
    from torch.utils.data import DataLoader

    from cpcl_bundle.networks import unet3d
    from cpcl_bundle.trainer import CPCLTrainer, paper_optimizer

    dev = torch.device(device)
    torch.manual_seed(0)
    method = variant
    if variant == "cpcl_naive":
        _use_naive_prototypes()
        method = "cpcl"
    net = unet3d().to(dev)
    opt = paper_optimizer(net.parameters())
    labeled = DataLoader(_data(2, patch), batch_size=2)
    unlabeled = DataLoader(_data(2, patch, with_label=False), batch_size=2)
    trainer = CPCLTrainer(
        dev,
        warmup + steps,
        labeled,
        net,
        opt,
        losses.supervised_loss(),
        unlabeled_data_loader=unlabeled,
        method=method,
        decollate=False,
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

    trainer.run()
    result = {
        "variant": variant,
        "patch": patch,
        "median_s": statistics.median(times[warmup:]),
        "peak_gb": _peak_memory_gb(dev),
        "steps": steps,
    }
    print(json.dumps(result))


def prototypes(patch: int = 64, repeats: int = 3, naive: bool = False, device: str = "cpu") -> None:
    """Forward + backward of L_fpc and L_bpc alone at a CPCL step's shapes (256 channels at patch/16)."""
    dev = torch.device(device)
    if naive:
        _use_naive_prototypes()
    torch.manual_seed(0)
    s = patch // 16
    f_l = torch.randn(2, 256, s, s, s, device=dev, requires_grad=True)
    f_u = torch.randn(2, 256, s, s, s, device=dev)
    y_l = torch.zeros(2, 1, patch, patch, patch, device=dev)
    y_l[:, :, patch // 4 : patch // 2] = 1
    p_u = torch.softmax(torch.randn(2, 2, patch, patch, patch, device=dev), 1)
    times = []
    for _ in range(repeats + 1):
        _sync(dev)
        t = time.perf_counter()
        fpc, _ = losses.forward_prototype_loss(f_l, y_l, f_u, p_u)
        bpc, _ = losses.backward_prototype_loss(f_l, y_l, f_u, p_u)
        (fpc + 10 * bpc).backward()
        _sync(dev)
        times.append(time.perf_counter() - t)
    result = {
        "variant": "prototypes_naive" if naive else "prototypes",
        "patch": patch,
        "median_s": statistics.median(times[1:]),
        "peak_gb": _peak_memory_gb(dev),
        "steps": repeats,
    }
    print(json.dumps(result))


def _child(args: list[str]) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


#: Every method of the paper's Table I, CPCL as the released code runs it, and CPCL with naive prototypes.
DEFAULT_VARIANTS = "supervised,mt,uamt,entropy_min,ict,dan,dtml,cpcl,cpcl_released,cpcl_naive"


def main(
    patch: int = 64,
    steps: int = 5,
    warmup: int = 2,
    device: str = "cpu",
    variants: str = DEFAULT_VARIANTS,
    output: str | None = None,
) -> None:
    """Run every variant (a method of ``cpcl_bundle.methods.METHODS``, or ``cpcl_naive``) in its own process and
    print the table (markdown); ``output`` also saves JSON."""
    names = [v.strip() for v in (variants.split(",") if isinstance(variants, str) else variants)]
    rows = []
    for name in names:
        print(f"[bench_step] {name} at {patch}^3 ...", file=sys.stderr, flush=True)
        rows.append(
            _child(
                [
                    "one",
                    f"--variant={name}",
                    f"--patch={patch}",
                    f"--steps={steps}",
                    f"--warmup={warmup}",
                    f"--device={device}",
                ]
            )
        )
    for naive in (False, True):
        print(f"[bench_step] prototype operations{' (naive)' if naive else ''} ...", file=sys.stderr, flush=True)
        rows.append(_child(["prototypes", f"--patch={patch}", f"--naive={naive}", f"--device={device}"]))
    ref = next((r["median_s"] for r in rows if r["variant"] == "mt"), None)
    cpcl = next((r["median_s"] for r in rows if r["variant"] == "cpcl"), None)
    threads = torch.get_num_threads()
    print(
        f"\nOne training step, batch 2 labeled + 2 unlabeled, {patch}^3, {device}, torch {torch.__version__}, "
        f"{threads} threads; median of {steps} steps after {warmup} warm-up; peak = "
        f"{'max allocated' if device.startswith('cuda') else 'peak RSS of the process'}\n"
    )
    print("| variant | step (s) | peak memory (GB) | time / MT | share of CPCL step |")
    print("|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r['median_s'] / ref:.2f}" if ref else "-"
        share = f"{100 * r['median_s'] / cpcl:.1f} %" if cpcl and r["variant"].startswith("prototypes") else ""
        print(f"| {r['variant']} | {r['median_s']:.3f} | {r['peak_gb']:.2f} | {ratio} | {share} |")
    if output:
        with open(output, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    commands = {"main": main, "one": one, "prototypes": prototypes}
    fire.Fire(commands if len(sys.argv) > 1 and sys.argv[1] in commands else main)
