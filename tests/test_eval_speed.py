"""scripts/eval_speed.py: the rows scale_check prints (evaluation per backend, gather bytes, padding per batch)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("faster_coco_eval")


@pytest.fixture(scope="module")
def eval_speed():
    path = Path(__file__).resolve().parents[1] / "scripts" / "eval_speed.py"
    spec = importlib.util.spec_from_file_location("eval_speed", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_eval_rows_time_both_backends_with_equal_stats_and_rle_is_smaller(eval_speed) -> None:
    rows = eval_speed.eval_rows(num_images=40, dets_per_image=20)
    timed = [r for r in rows if "backend" in r]
    assert [r["backend"] for r in timed] == ["pycocotools", "faster_coco_eval"]
    assert all(r["every_stat_and_per_class_ap_equal"] and r["seconds"] > 0 for r in timed)
    assert 0 < timed[0]["AP"] == timed[1]["AP"] < 1
    gathered = {r["form"].split()[0]: r["bytes_per_image"] for r in rows if "form" in r}
    assert gathered["RLE"] * 50 < gathered["dense"]


def test_padding_rows_grouping_cuts_padding_and_one_shape_pads_only_to_the_stride(eval_speed) -> None:
    widths, heights = eval_speed.coco_like_sizes(400)
    off, two, eight = eval_speed.padding_rows(widths, heights, batch_size=2, seed=0)
    assert off["grouping"] == "off" and eight["grouping"].startswith("on")
    assert eight["padded_pixels_per_batch"] < two["padded_pixels_per_batch"] < off["padded_pixels_per_batch"]
    assert off["micro_batches"] == eight["micro_batches"] == 200
    same = eval_speed.padding_rows(np.full(10, 640), np.full(10, 480), batch_size=2, seed=0)
    # 640 x 480 becomes 1066 x 800, padded to 1088 x 800 (a multiple of 32) with or without groups.
    assert {r["padded_pixels_per_batch"] for r in same} == {2 * 800 * (1088 - 1066)}
