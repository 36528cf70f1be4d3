"""Training speed: per backbone (a table), or frcnn_train against torchvision's own training loop.

    python scripts/benchmark.py --vs-torchvision         # end to end: each side through its own loader
    python scripts/benchmark.py --vs-torchvision --compute-only   # the same batches already on the device
    python scripts/benchmark.py --vs-torchvision --accuracy   # both sides trained the whole schedule: AP each
    python scripts/benchmark.py --vs-torchvision --device cuda --steps 20 --json result.json
    python scripts/benchmark.py --vs-torchvision --compute-only model=maskrcnn_resnet50_fpn_v2  # vs its _v2 builder
    python scripts/benchmark.py                          # every backbone, faster_rcnn, default shapes sizes
    python scripts/benchmark.py --arch mask_rcnn --backbones resnet18_fpn resnet50_fpn --steps 10
    python scripts/benchmark.py --device cuda --batch-size 8 model.min_size=800 model.max_size=1333

Overrides (key=value) apply to every row. Times are medians over --steps timed
optimizer steps after --warmup untimed ones, on real shapes batches. Each row runs
in a fresh process, so its CPU peak memory is its own. --vs-torchvision is
described in scripts/vs_torchvision.py.
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

from frcnn_train.config import compose_config
from frcnn_train.data import build_datasets, build_train_loader
from frcnn_train.models import BACKBONES, build_model


def time_train_steps(overrides: list[str], *, steps: int, warmup: int, device_name: str) -> dict[str, Any]:
    """Median seconds per SGD step, images/s, parameter count and peak memory for the composed config."""
    cfg = compose_config(overrides)
    device = torch.device(device_name)
    torch.manual_seed(0)
    data = build_datasets(cfg.data, with_masks=cfg.model.arch == "mask_rcnn")
    cfg.model.num_classes = len(data.classes)
    model = build_model(cfg.model).to(device).train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    batch_size = cfg.trainer.batch_size
    loader = build_train_loader(data.train, batch_size=batch_size, num_workers=0, seed=0, epoch=0)
    batches = iter(loader)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(warmup + steps):
        images, targets = next(batches)
        images = [im.to(device) for im in images]
        targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        loss = sum(model(images, targets).values())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    step = statistics.median(times)
    memory = (
        torch.cuda.max_memory_allocated(device) / 2**20
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    return {
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "step_s": step,
        "images_per_s": batch_size / step,
        "memory_mb": memory,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="faster_rcnn", choices=["faster_rcnn", "mask_rcnn"])
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONES))
    parser.add_argument("--batch-size", type=int, default=None, help="table: default 4; --vs-torchvision: the config's")
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps (per round with --vs-torchvision)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--vs-torchvision",
        action="store_true",
        help="alternate rounds of torchvision's plain loop and our Trainer; last line is the ratio",
    )
    parser.add_argument("--rounds", type=int, default=5, help="--vs-torchvision: timed rounds per side")
    parser.add_argument(
        "--compute-only",
        action="store_true",
        help="with --vs-torchvision: the same batches already on the device for both sides",
    )
    parser.add_argument(
        "--sides",
        nargs="+",
        choices=["torchvision", "frcnn_train"],
        default=["torchvision", "frcnn_train"],
        help="with --vs-torchvision: run only these sides (frcnn_train alone: to compare its options)",
    )
    parser.add_argument("--json", type=Path, default=None, help="with --vs-torchvision: also write the figures here")
    parser.add_argument(
        "--accuracy",
        action="store_true",
        help="with --vs-torchvision: train both sides the whole schedule and print each side's AP",
    )
    args, overrides = parser.parse_known_args()
    if args.vs_torchvision and args.accuracy:
        from vs_torchvision import accuracy  # scripts/ is on sys.path when this file runs

        accuracy(device_name=args.device, overrides=overrides)
        return
    if args.vs_torchvision:
        from vs_torchvision import compare

        batch = [f"trainer.batch_size={args.batch_size}"] if args.batch_size else []
        compare(
            device_name=args.device,
            steps=args.steps,
            rounds=args.rounds,
            warmup=max(args.warmup, 1),
            overrides=batch + overrides,
            compute_only_mode=args.compute_only,
            json_path=args.json,
            sides=tuple(s for s in ("torchvision", "frcnn_train") if s in args.sides),
        )
        return
    args.batch_size = args.batch_size or 4
    device = torch.device(args.device)
    print(
        f"{args.arch}, batch {args.batch_size}, {device}, median of {args.steps} steps; overrides: {overrides or 'none'}"
    )
    print(f"{'backbone':<18}{'params (M)':>11}{'step (s)':>10}{'images/s':>10}{'peak mem (MB)':>15}")
    for backbone in args.backbones:
        row = [f"model={args.arch}", f"model/backbone={backbone}", f"trainer.batch_size={args.batch_size}", *overrides]
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as fresh_process:
            r = fresh_process.submit(
                time_train_steps, row, steps=args.steps, warmup=args.warmup, device_name=args.device
            ).result()
        print(
            f"{backbone:<18}{r['params_m']:>11.2f}{r['step_s']:>10.3f}{r['images_per_s']:>10.1f}{r['memory_mb']:>15.0f}",
            flush=True,
        )
    if device.type == "cpu":
        print("(CPU peak memory: the row's process maximum resident set, Python and torch included)")


if __name__ == "__main__":
    main()
