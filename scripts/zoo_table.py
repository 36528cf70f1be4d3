"""Print docs/model-zoo.md's table of torchvision's detectors from torchvision's own weights metadata.

    python scripts/zoo_table.py

Nothing is typed by hand: the builders are frcnn_train.zoo.BUILDERS, the AP values and files come from each
builder's DEFAULT weights enum (meta["_metrics"], url, meta["_file_size"]), so a torchvision upgrade is one rerun.
"""

from __future__ import annotations

from pathlib import Path

from torchvision.models import get_model_weights

from frcnn_train.zoo import BUILDERS, full_name


def table() -> str:
    header = (
        "| `model=` (torchvision builder) | weights (`init_from=torchvision`) | COCO val2017 box AP | mask AP "
        "| file (MB) |"
    )
    rows = [header, "|---|---|---|---|---|"]
    for builder in BUILDERS:
        weights = get_model_weights(builder).DEFAULT
        metrics = weights.meta["_metrics"]["COCO-val2017"]
        mask = metrics.get("mask_map")
        rows.append(
            f"| `{builder}` | `{full_name(weights)}` | {metrics['box_map']:.1f} | "
            f"{'' if mask is None else f'{mask:.1f}'} | [{Path(weights.url).name}]({weights.url}) "
            f"({weights.meta['_file_size']:.0f}) |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
