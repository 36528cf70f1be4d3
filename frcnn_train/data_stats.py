"""`frcnn-data stats`: what a dataset holds, in the pixels the model sees, as a table and PNG plots.

Everything comes from the datasets' stored records (no image is decoded). Box sizes and aspect
ratios are given after the model's resize (GeneralizedRCNNTransform: model.min_size / max_size),
where they meet the anchors; small / medium / large are COCO's area ranges on the annotations'
own pixels, as COCOeval's APs / APm / APl count them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from frcnn_train.anchors import AREA_RANGES, AnchorSetup, Boxes, resize_boxes


@dataclass
class SplitStats:
    name: str
    images: int  # images training (or evaluation) reads
    empty_images: int  # of those, without an object (val), plus those data.skip_empty left out (train)
    crowd: int  # crowd regions (never training targets)
    objects_per_image: np.ndarray  # [images]
    per_class: np.ndarray  # [classes] instances
    image_hw: np.ndarray  # [images, 2] in the annotations' pixels
    box_wh: np.ndarray  # [objects, 2] after the model's resize
    area: np.ndarray  # [objects] COCO area, the annotations' pixels


def split_stats(
    name: str, dataset: Any, num_classes: int, setup: AnchorSetup, *, left_out: int = 0, crowd_left_out: int = 0
) -> SplitStats:
    """Stats of one split; `left_out` images and `crowd_left_out` crowd regions the reader dropped (train)."""
    records = [dataset.record(i) for i in range(len(dataset))]
    crowd = crowd_left_out + sum(int(r["iscrowd"].sum()) for r in records)
    counts = np.array([int((r["iscrowd"] == 0).sum()) for r in records], dtype=np.int64)
    labels = np.concatenate([r["labels"][r["iscrowd"] == 0] for r in records] or [np.zeros(0, np.int64)])
    boxes = Boxes.from_dataset(dataset)
    resized, _ = resize_boxes(boxes, setup.min_size, setup.max_size)
    return SplitStats(
        name=name,
        images=len(records),
        empty_images=int((counts == 0).sum()) + left_out,
        crowd=crowd,
        objects_per_image=counts,
        per_class=np.bincount(labels, minlength=num_classes + 1)[1:],
        image_hw=np.array([r["size"] for r in records], dtype=np.int64).reshape(-1, 2),
        box_wh=resized[:, 2:] - resized[:, :2],
        area=boxes.area,
    )


def _pct(values: np.ndarray, digits: int = 0) -> str:
    if not values.size:
        return "-"
    lo, p10, med, p90, hi = np.percentile(values, [0, 10, 50, 90, 100])
    return " / ".join(f"{v:.{digits}f}" for v in (lo, p10, med, p90, hi))


def format_stats(stats: list[SplitStats], classes: list[str], setup: AnchorSetup) -> str:
    lines = [
        f"(sizes after the model's resize: model.min_size={setup.min_size}, max_size={setup.max_size}; "
        "distributions as min / p10 / median / p90 / max)"
    ]
    for s in stats:
        side = np.sqrt(np.prod(s.box_wh, axis=1)) if s.box_wh.size else np.zeros(0)
        with np.errstate(divide="ignore", invalid="ignore"):
            aspect = s.box_wh[:, 0] / s.box_wh[:, 1] if s.box_wh.size else np.zeros(0)
        ranges = ", ".join(f"{n} {int(((s.area >= lo) & (s.area < hi)).sum())}" for n, (lo, hi) in AREA_RANGES.items())
        lines += [
            f"{s.name}:",
            f"  images               {s.images} read, {s.empty_images} without objects"
            f"{' (left out of training)' if s.name == 'train' else ''}, {s.crowd} crowd regions",
            f"  objects              {int(s.objects_per_image.sum())}; per image {_pct(s.objects_per_image)}",
            f"  image height         {_pct(s.image_hw[:, 0])} px (annotations' pixels)",
            f"  image width          {_pct(s.image_hw[:, 1])} px",
            f"  box sqrt(w*h)        {_pct(side, 1)} px after resize",
            f"  box aspect w/h       {_pct(aspect, 2)}",
            f"  COCO size ranges     {ranges} (annotations' pixels, as APs/APm/APl count them)",
        ]
    width = max(len(c) for c in classes) if classes else 5
    lines.append(f"  {'class':<{width}}  " + "  ".join(f"{s.name:>8}" for s in stats))
    for k, name in enumerate(classes):
        lines.append(f"  {name:<{width}}  " + "  ".join(f"{int(s.per_class[k]):>8}" for s in stats))
    return "\n".join(lines)


def stats_figures(stats: list[SplitStats], classes: list[str], setup: AnchorSetup) -> dict[str, Any]:
    """{name: figure}; empty without matplotlib (eval_plots says once how to get it)."""
    from frcnn_train.eval_plots import matplotlib_or_none

    plt = matplotlib_or_none()
    if plt is None:
        return {}
    figures = {}
    fig, ax = plt.subplots(figsize=(max(5.0, 0.4 * len(classes) + 2), 4))
    x = np.arange(len(classes))
    for i, s in enumerate(stats):
        ax.bar(x + i * 0.8 / len(stats), s.per_class, width=0.8 / len(stats), label=s.name)
    ax.set_xticks(x + 0.4 - 0.4 / len(stats), classes, rotation=45, ha="right", fontsize=8)
    ax.set(ylabel="instances", title="instances per class")
    ax.legend()
    fig.tight_layout()
    figures["instances_per_class"] = fig

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for s in stats:
        axes[0].hist(
            s.objects_per_image, bins=np.arange(s.objects_per_image.max(initial=0) + 2) - 0.5, alpha=0.6, label=s.name
        )
        axes[1].scatter(s.image_hw[:, 1], s.image_hw[:, 0], s=4, alpha=0.4, label=s.name)
        side = np.sqrt(np.prod(s.box_wh, axis=1))
        if side.size:
            axes[2].hist(side, bins=np.geomspace(max(side.min(), 1), max(side.max(), 2), 40), alpha=0.6, label=s.name)
    for size in sorted(set(setup.sizes)):
        axes[2].axvline(size, color="k", linestyle=":", linewidth=1)
    axes[0].set(xlabel="objects per image", ylabel="images", title="objects per image")
    axes[1].set(xlabel="width (px)", ylabel="height (px)", title="image sizes (annotations' pixels)")
    axes[2].set(
        xscale="log",
        xlabel="sqrt(w*h) after resize (px); dotted: model.anchor_sizes",
        ylabel="boxes",
        title="box sizes as the model sees them",
    )
    for ax in axes:
        ax.legend(fontsize=8)
    fig.tight_layout()
    figures["images_and_sizes"] = fig

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for s in stats:
        if s.box_wh.size:
            axes[0].scatter(s.box_wh[:, 0], s.box_wh[:, 1], s=3, alpha=0.3, label=s.name)
            axes[1].hist(np.log2(s.box_wh[:, 0] / np.maximum(s.box_wh[:, 1], 1e-9)), bins=40, alpha=0.6, label=s.name)
    for r in setup.ratios:
        axes[1].axvline(np.log2(1 / r), color="k", linestyle=":", linewidth=1)  # torchvision's ratio is h/w
    axes[0].set(
        xscale="log", yscale="log", xlabel="box width (px, after resize)", ylabel="box height", title="box shapes"
    )
    axes[1].set(xlabel="log2(w/h); dotted: model.aspect_ratios", ylabel="boxes", title="box aspect ratios")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.tight_layout()
    figures["box_shapes"] = fig
    return figures


def write_stats(out_dir: Path, stats: list[SplitStats], classes: list[str], setup: AnchorSetup) -> list[Path]:
    """The table as stats.txt and the plots as PNG in out_dir; returns the files written."""
    from frcnn_train.eval_plots import save_figures
    from frcnn_train.outputs import STATS_HEAD, write_owned

    table = out_dir / "stats.txt"
    text = f"{STATS_HEAD}\n{format_stats(stats, classes, setup)}\n"
    write_owned(table, text.encode("utf-8"), kind="stats", command="frcnn-data stats")
    return [table, *save_figures(stats_figures(stats, classes, setup), out_dir, command="frcnn-data stats")]
