"""`python -m frcnn_train.evaluate CKPT [overrides] [--out FILE]`: COCO AP of a checkpoint.

The model is rebuilt from the checkpoint's own config and evaluated exactly as
the Trainer does (same eval loader, batch size and autocast), so on the run's
own val split the numbers equal the ones the run logged. Only data, device and
batch-size keys may be overridden: the architecture is the checkpoint's.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from frcnn_train import checkpoint
from frcnn_train.composition import composition_error
from frcnn_train.config import check_values, compose_config, with_schema
from frcnn_train.data import build_datasets, build_eval_loader, resolve_num_workers
from frcnn_train.errors import CheckpointError, ConfigError
from frcnn_train.evaluation import evaluate, format_table
from frcnn_train.models import build_model, diff_layouts, tensor_layout
from frcnn_train.runtime import amp_dtype, cli, prog_name, resolve_device, seed_everything

# Leaf keys evaluate may change besides anything under `data`.
ALLOWED_KEYS = ("device", "trainer.batch_size", "trainer.amp", "trainer.amp_dtype")


def compose_overrides(overrides: Sequence[str]) -> DictConfig:
    """compose_config, with Hydra's and OmegaConf's errors turned into one ConfigError sentence."""
    try:
        return compose_config(list(overrides))
    except Exception as err:
        if (user := composition_error(err)) is None:
            raise
        raise user from None


def _override_keys(overrides: Sequence[str]) -> list[str]:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except HydraException as err:
        raise composition_error(err) from None
    return [o.key_or_group.replace("/", ".") for o in parsed]


def apply_overrides(saved: dict[str, Any], overrides: Sequence[str]) -> DictConfig:
    """The checkpoint's config with data / device / batch-size overrides; model.* is refused.

    `data=<name>` replaces the whole data subtree by the composed one, so no key
    of the checkpoint's dataset leaks into another dataset's config.
    """
    cfg = with_schema(saved)
    if not overrides:
        return cfg
    keys = _override_keys(overrides)
    model_keys = [k for k in keys if k == "model" or k.startswith("model.")]
    if model_keys:
        raise ConfigError(
            f"evaluate rebuilds the model from the checkpoint's config, so {', '.join(model_keys)} cannot be "
            "overridden; evaluate a checkpoint trained with that architecture instead"
        )
    other = [k for k in keys if k not in ALLOWED_KEYS and k != "data" and not k.startswith("data.")]
    if other:
        raise ConfigError(f"evaluate cannot override {', '.join(other)}; it accepts data=, data.*, "
                          f"{', '.join(ALLOWED_KEYS)} and data.num_workers")
    composed = compose_overrides(overrides)
    if "data" in keys:
        cfg.data = composed.data
    for key in keys:
        if key != "data":
            OmegaConf.update(cfg, key, OmegaConf.select(composed, key), merge=False)
    return cfg


def load_model(ckpt: dict[str, Any], cfg: DictConfig, source: str, *, raw: bool = False) -> torch.nn.Module:
    """The checkpoint's model rebuilt from its config, in eval mode on the CPU, with its inference
    weights (checkpoint.inference_weights: the EMA's when it has them, unless `raw`)."""
    model = build_model(cfg.model, read_backbone_weights=False)
    weights, _ = checkpoint.inference_weights(ckpt, raw=raw)
    try:
        model.load_state_dict(weights)
    except RuntimeError:
        lines = diff_layouts(tensor_layout(weights), tensor_layout(model))
        raise CheckpointError(
            f"the model rebuilt from {source}'s config does not match its weights ({'; '.join(lines[:4])}); "
            "use the frcnn_train version that wrote it"
        ) from None
    return model.eval()


def run_evaluation(ckpt_path: str | Path, overrides: Sequence[str] = (),
                   out: str | Path | None = None, *, raw: bool = False) -> tuple[dict[str, float], Path, str]:
    """Evaluate a checkpoint (its EMA weights when it has them, unless `raw`); returns the metrics, the
    COCO results file written and which weights ran ("ema" or "raw")."""
    path = checkpoint.checkpoint_in(ckpt_path)
    out_path = _results_path(out, path)
    ckpt = checkpoint.load_checkpoint(path)
    cfg = apply_overrides(ckpt["config"], overrides)
    check_values(cfg, keys=("data", "trainer.batch_size", "trainer.amp_dtype"))  # what evaluate lets a user change
    with_masks = cfg.model.arch == "mask_rcnn"
    device = resolve_device(cfg.device)
    # The run evaluated under these settings; matching them keeps the numbers identical.
    seed_everything(cfg.seed, cfg.trainer.deterministic, device)
    data = build_datasets(cfg.data, with_masks=with_masks)
    if list(data.classes) != list(ckpt["classes"]):
        raise ConfigError(
            f"the dataset's classes {data.classes} differ from the checkpoint's {ckpt['classes']}, so its labels "
            "would be scored as the wrong categories; evaluate on a dataset with the same classes"
        )
    model = load_model(ckpt, cfg, str(path), raw=raw).to(device)
    loader = build_eval_loader(data.val, batch_size=cfg.trainer.batch_size,
                               num_workers=resolve_num_workers(cfg.data.num_workers, device))
    dtype = amp_dtype(cfg.trainer.amp, cfg.trainer.amp_dtype, device)
    metrics, results = evaluate(model, loader, coco_gt=data.val.coco, label_to_cat_id=data.val.label_to_cat_id,
                                device=device, with_masks=with_masks, autocast_dtype=dtype)
    # COCO.loadRes adds area / id / iscrowd (and box polygons) to the dicts it is given; write only ours.
    keep = ("image_id", "category_id", "bbox", "score") + (("segmentation",) if with_masks else ())
    results = [{k: r[k] for k in keep if k in r} for r in results]
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(results))
    except OSError as err:
        raise ConfigError(f"the detections could not be written to {out_path} ({err.strerror}); "
                          "give a writable file with --out") from None
    return metrics, out_path, checkpoint.inference_weights(ckpt, raw=raw)[1]


def _results_path(out: str | Path | None, ckpt_path: Path) -> Path:
    """Where the COCO results go, checked before any work: --out (a directory gets the default name), else
    beside the checkpoint; a path through a file is refused."""
    name = f"detections_{ckpt_path.stem}.json"
    out_path = Path(out).expanduser() if out else ckpt_path.parent / name
    if out_path.is_dir():
        out_path = out_path / name
    existing = next(p for p in (out_path, *out_path.parents) if p.exists())
    if existing != out_path and not existing.is_dir():
        raise ConfigError(f"--out {out_path} passes through the file {existing}; give a file in a directory")
    return out_path


@cli
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog_name("frcnn_train.evaluate"), description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="checkpoint file (or run directory: best.pth, else last.pth)")
    parser.add_argument("overrides", nargs="*", help="data=..., data.*=..., device=..., trainer.batch_size=...")
    parser.add_argument("--out", help="COCO results JSON, or a directory for it "
                                      "(default: <ckpt dir>/detections_<ckpt stem>.json)")
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON instead of a table")
    parser.add_argument("--raw", action="store_true",
                        help="evaluate the trained weights, not the EMA's (for checkpoints of runs with trainer.ema)")
    args = parser.parse_args(argv)
    metrics, out, weights = run_evaluation(args.checkpoint, args.overrides, args.out, raw=args.raw)
    if args.json:
        print(json.dumps({"metrics": metrics, "detections": str(out), "weights": weights}))
    else:
        which = "the EMA weights (--raw: the trained ones)" if weights == "ema" else "the trained weights"
        print(f"{format_table(metrics)}\nweights: {which}\ndetections: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
