"""Measurements that scripts/gpu_check.py runs, each in a process of its own.

    python scripts/gpu_probes.py profile --device cuda --out profile.txt --json profile.json [overrides]
    python scripts/gpu_probes.py roi_align --device cuda --json roi_align.json
    python scripts/gpu_probes.py compare straight/last.pth resumed/last.pth --json compare.json

`profile`: torch.profiler over our training step (Trainer.train_step and the StepLog, the batches
already on the device; the benchmark's CUDA sizes: R50-FPN, 800 px, batch 8, fp16), the top ops by
self device time (CPU: self CPU time), and the step's milliseconds without the profiler.
`roi_align`: forward + backward of the box and mask RoI pooling at the R50-FPN 800 px sizes, for
torchvision's CUDA kernel, torchvision with deterministic algorithms on (its pure-Python path), and
our matrix form (models/roi_align.py, what trainer.deterministic=true uses on CUDA).
`compare`: two checkpoints tensor by tensor over every part of the training state (state.PARTS).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _sync(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _event_ms(event: Any, *names: str) -> float:
    for name in names:  # torch renamed cuda_* to device_* (both exist in 2.4-2.14)
        if hasattr(event, name):
            return getattr(event, name) / 1000
    return float("nan")


def profile(args: argparse.Namespace, overrides: list[str]) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from frcnn_train.data import build_datasets
    from vs_torchvision import build_our_trainer, compose, device_batches, our_step

    device = torch.device(args.device)
    _, cfg = compose(device, overrides, speed=True)
    cfg.model.num_classes = len(build_datasets(cfg.data, with_masks=cfg.model.arch == "mask_rcnn").classes)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build_our_trainer(cfg, Path(tmp) / "run")
        batches = device_batches(trainer, 4)
        step = iter(range(10**9))

        def one() -> None:
            our_step(trainer, [batches[next(step) % len(batches)]])

        for _ in range(args.warmup):
            one()
        start = _sync(device)
        for _ in range(args.steps):
            one()
        step_ms = (_sync(device) - start) / args.steps * 1000
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with torch_profile(activities=activities) as prof:
            for _ in range(args.steps):
                one()
            _sync(device)
        trainer.step_log.logger.close()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    averages = prof.key_averages()
    table = averages.table(sort_by=key, row_limit=args.rows)
    header = (
        f"{cfg.model.arch} {cfg.model.backbone.name}, {cfg.model.min_size} px, batch {cfg.trainer.batch_size}, "
        f"AMP {cfg.trainer.amp} ({cfg.trainer.amp_dtype}), {device}: {args.steps} steps profiled, "
        f"{step_ms:.1f} ms per step without the profiler; sorted by {key}\n"
    )
    if args.out:
        Path(args.out).write_text(header + table)
    names = ("self_device_time_total", "self_cuda_time_total") if device.type == "cuda" else ("self_cpu_time_total",)
    events = sorted(averages, key=lambda e: _event_ms(e, *names), reverse=True)[:15]
    total = sum(_event_ms(e, *names) for e in averages)
    return {
        "step_ms": step_ms,
        "images_per_s": cfg.trainer.batch_size * 1000 / step_ms,
        "sorted_by": key,
        "top": [
            {
                "op": e.key,
                "ms_per_step": _event_ms(e, *names) / args.steps,
                "share": _event_ms(e, *names) / total if total else float("nan"),
                "calls_per_step": e.count / args.steps,
            }
            for e in events
        ],
    }


def roi_align(args: argparse.Namespace, overrides: list[str]) -> dict[str, Any]:
    from torchvision.ops import MultiScaleRoIAlign

    from frcnn_train.models.roi_align import MatmulMultiScaleRoIAlign

    device = torch.device(args.device)
    big = device.type == "cuda"
    # R50-FPN at 800 x 1216: FPN maps of 256 channels at strides 4..32; 512 box rois and 128 mask rois per image.
    images, channels, height, width = (8, 256, 800, 1216) if big else (2, 16, 128, 128)
    per_image = {7: 512 if big else 32, 14: 128 if big else 8}
    g = torch.Generator().manual_seed(0)
    shapes = [(height, width)] * images
    features = {
        str(i): torch.randn(images, channels, height // 4 // 2**i, width // 4 // 2**i, generator=g)
        .to(device)
        .requires_grad_()
        for i in range(4)
    }
    result: dict[str, Any] = {
        "images": images,
        "channels": channels,
        "size": [height, width],
        "rois_per_image": per_image,
    }
    for output, count in per_image.items():
        boxes = []
        for _ in range(images):
            xy = torch.rand(count, 2, generator=g) * torch.tensor([width * 0.9, height * 0.9])
            wh = (torch.rand(count, 2, generator=g) ** 2 * 0.5 + 0.01) * torch.tensor([width, height])
            boxes.append(torch.cat([xy, xy + wh], 1).to(device))
        upstream = torch.randn(images * count, channels, output, output, generator=g).to(device)
        # The slowest last; the JSON is rewritten after each, so a killed run keeps what it measured.
        for name, pool, deterministic in (
            ("matmul (ours, deterministic)", MatmulMultiScaleRoIAlign, True),
            ("torchvision kernel", MultiScaleRoIAlign, False),
            ("torchvision, deterministic algorithms", MultiScaleRoIAlign, True),
        ):
            module = pool(list("0123"), output, 2)
            torch.use_deterministic_algorithms(deterministic, warn_only=True)
            times = []
            try:
                for _ in range(1 + args.repeats):
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(device)
                    start = _sync(device)
                    out = module(features, boxes, shapes)
                    torch.autograd.grad(out, list(features.values()), upstream, allow_unused=True)
                    times.append((_sync(device) - start) * 1000)
                memory = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
                result[f"{output}x{output} {name}"] = {"ms": statistics.median(times[1:]), "peak_mb": memory}
            except Exception as err:  # e.g. out of memory: the figure is the failure
                result[f"{output}x{output} {name}"] = {"error": f"{type(err).__name__}: {str(err)[:200]}"}
            finally:
                torch.use_deterministic_algorithms(False)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            if args.json:
                args.json.write_text(json.dumps(result, indent=1))
    return result


def compare(args: argparse.Namespace, overrides: list[str]) -> dict[str, Any]:
    """Every part of the training state of two checkpoints, tensor by tensor (the trainer's resume history aside)."""
    from frcnn_train import checkpoint
    from frcnn_train.state import PARTS

    a, b = (checkpoint.load_checkpoint(Path(p)) for p in args.paths)
    counts = {"tensors": 0, "values": 0}
    differ: list[str] = []

    def walk(x: Any, y: Any, where: str) -> None:
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            counts["tensors"] += 1
            same = (
                isinstance(x, torch.Tensor)
                and isinstance(y, torch.Tensor)
                and x.dtype == y.dtype
                and x.shape == y.shape
                and torch.equal(x, y)
            )
            if not same:
                diff = (
                    (x.double() - y.double()).abs().max().item()
                    if isinstance(x, torch.Tensor)
                    and isinstance(y, torch.Tensor)
                    and x.shape == y.shape
                    and x.dtype.is_floating_point
                    else None
                )
                differ.append(f"{where} (max abs diff {diff})" if diff is not None else where)
        elif isinstance(x, dict) and isinstance(y, dict):
            for key in sorted(set(x) | set(y), key=str):
                walk(x.get(key), y.get(key), f"{where}.{key}")
        elif isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)) and len(x) == len(y):
            for i, (u, v) in enumerate(zip(x, y)):
                walk(u, v, f"{where}[{i}]")
        else:
            counts["values"] += 1
            if x != y and not (x != x and y != y):  # NaN equals NaN here
                differ.append(f"{where} ({x!r} vs {y!r})")

    for part in PARTS:
        x, y = a.get(part), b.get(part)
        if part == "trainer" and isinstance(x, dict) and isinstance(y, dict):
            x, y = ({k: v for k, v in d.items() if k != "history"} for d in (x, y))
        walk(x, y, part)
    return {
        "bitwise_equal": not differ,
        "tensors": counts["tensors"],
        "values": counts["values"],
        "differing": len(differ),
        "first_differences": differ[:10],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["profile", "roi_align", "compare"])
    parser.add_argument("paths", nargs="*", help="compare: two checkpoints")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None, help="profile: the table's file")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rows", type=int, default=30)
    args, overrides = parser.parse_known_args()
    if args.what == "compare" and len(args.paths) != 2:
        parser.error("compare takes two checkpoint files")
    result = {"profile": profile, "roi_align": roi_align, "compare": compare}[args.what](args, overrides)
    text = json.dumps(result, indent=1)
    if args.json:
        args.json.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
