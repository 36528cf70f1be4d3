"""What attention costs: parameters and training-step time per block type and site set, relative to none.

    python scripts/attention_cost.py                                  # resnet18_fpn, faster_rcnn, default shapes sizes
    python scripts/attention_cost.py --arch mask_rcnn --steps 10 --types se eca
    python scripts/attention_cost.py --backbone resnet50_fpn --devices cuda model.min_size=800 model.max_size=1333

Site sets are built from the backbone's own sites: `backbone` (every stage feeding the
FPN), `fpn` (every FPN level), `roi_heads` (the box head, and the mask head for
mask_rcnn) and `all`. A row's step time is the median over --steps timed SGD steps
after --warmup untimed ones (scripts/benchmark.py's `time_train_steps`), and the
fastest of --rounds such medians: the rounds go over the whole table in turn, so a
busy spell on a shared machine slows one round of every row rather than one row.
The `none (again)` row is the baseline's own spread between rounds.
Overrides (key=value) apply to every row.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # scripts/ is not a package
from benchmark import time_train_steps  # noqa: E402
from frcnn_train.config import compose_config  # noqa: E402
from frcnn_train.models.attention import BLOCKS  # noqa: E402
from frcnn_train.models.builder import valid_attention_sites  # noqa: E402


def site_sets(sites: list[str]) -> dict[str, list[str]]:
    return {
        "backbone": [s for s in sites if s.startswith("backbone.")],
        "fpn": [s for s in sites if s.startswith("fpn.")],
        "roi_heads": [s for s in sites if s.startswith("roi_heads.")],
        "all": sites,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="faster_rcnn", choices=["faster_rcnn", "mask_rcnn"])
    parser.add_argument("--backbone", default="resnet18_fpn")
    parser.add_argument("--types", nargs="+", default=list(BLOCKS), choices=list(BLOCKS))
    parser.add_argument("--sets", nargs="+", default=["backbone", "fpn", "roi_heads", "all"])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    default_devices = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    parser.add_argument("--devices", nargs="+", default=default_devices)
    args, overrides = parser.parse_known_args()

    base = [
        f"model={args.arch}",
        f"model/backbone={args.backbone}",
        f"trainer.batch_size={args.batch_size}",
        *overrides,
    ]
    probe = compose_config(base)
    sets = {name: sites for name, sites in site_sets(valid_attention_sites(probe.model)).items() if name in args.sets}
    print(
        f"{args.arch} / {args.backbone}, batch {args.batch_size}, {probe.model.min_size} px, "
        f"fastest of {args.rounds} medians of {args.steps} steps; overrides: {overrides or 'none'}"
    )
    for name, sites in sets.items():
        print(f"  {name}: {', '.join(sites)}")

    rows = [("none", "-", [])] + [
        (kind, name, [f"model/attention={kind}", f"model.attention.sites=[{','.join(sites)}]"])
        for kind in args.types
        for name, sites in sets.items()
    ]
    for device_name in args.devices:
        device = torch.device(device_name)
        print(
            f"\n{device}"
            + (
                f" ({torch.cuda.get_device_name(device)})"
                if device.type == "cuda"
                else f" ({torch.get_num_threads()} threads)"
            )
        )
        # The first model a process trains pays for thread pools, allocator and kernel caches; not a row's cost.
        time_train_steps(compose_config(base), steps=1, warmup=args.warmup, device=device)
        results: list[list[dict]] = [[] for _ in rows]
        for _ in range(args.rounds):
            for i, (_, _, extra) in enumerate(rows):
                results[i].append(
                    time_train_steps(compose_config(base + extra), steps=args.steps, warmup=args.warmup, device=device)
                )
                print(".", end="", file=sys.stderr, flush=True)  # progress; the table comes at the end
        print(file=sys.stderr)
        steps = [min(r["step_s"] for r in rounds) for rounds in results]
        params = [rounds[0]["params_m"] for rounds in results]
        print(f"{'type':<10}{'sites':<11}{'params (M)':>11}{'added':>10}{'step (s)':>10}{'step x':>8}")
        for (kind, where, _), step, p in zip(rows, steps, params):
            print(
                f"{kind:<10}{where:<11}{p:>11.3f}{round((p - params[0]) * 1e6):>10,}{step:>10.3f}{step / steps[0]:>8.2f}"
            )
        spread = [r["step_s"] for r in results[0]]
        print(
            f"{'none':<10}{'(again)':<11}{'':>21}{max(spread):>10.3f}{max(spread) / steps[0]:>8.2f}"
            "  (slowest baseline round: the noise floor)"
        )


if __name__ == "__main__":
    main()
