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

from frcnn_train import checkpoint, outputs
from frcnn_train.composition import composition_error
from frcnn_train.config import check_values, compose_config
from frcnn_train.data import build_datasets, build_eval_loader, resolve_num_workers
from frcnn_train.errors import CheckpointError, ConfigError
from frcnn_train.evaluation import evaluate, format_table
from frcnn_train.logs import log
from frcnn_train.models import architecture_spec, build_model
from frcnn_train.models.fingerprint import config_mismatch, mismatch_advice
from frcnn_train.resume import saved_config
from frcnn_train.runtime import amp_dtype, cli, prog_name, resolve_device, seed_everything
from frcnn_train.zoo import is_zoo_source

# Leaf keys evaluate may change besides anything under `data`.
ALLOWED_KEYS = ("device", "trainer.batch_size", "trainer.amp", "trainer.amp_dtype", "eval.backend")


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


def apply_overrides(
    saved: dict[str, Any],
    overrides: Sequence[str],
    *,
    command: str = "evaluate",
    allowed: Sequence[str] = ALLOWED_KEYS,
    source: str = "the checkpoint",
    versions: dict[str, Any] | None = None,
) -> DictConfig:
    """The checkpoint's config with data overrides and the `allowed` keys (evaluate: device, batch size,
    autocast; export: none); model.* is refused.

    `data=<name>` replaces the whole data subtree by the composed one, so no key
    of the checkpoint's dataset leaks into another dataset's config. `source`, `versions`: the file and
    its versions, for the message when its config does not validate (resume.saved_config).
    """
    cfg = saved_config(saved, source, versions)
    if not overrides:
        return cfg
    keys = _override_keys(overrides)
    model_keys = [k for k in keys if k == "model" or k.startswith("model.")]
    if model_keys:
        raise ConfigError(
            f"{command} rebuilds the model from the checkpoint's config, so {', '.join(model_keys)} cannot be "
            f"overridden; {command} a checkpoint trained with that architecture instead"
        )
    other = [k for k in keys if k not in allowed and k != "data" and not k.startswith("data.")]
    if other:
        raise ConfigError(
            f"{command} cannot override {', '.join(other)}; it accepts data= and data.* (e.g. "
            f"data.root=, data.num_workers=){''.join(f', {k}' for k in allowed)}"
        )
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
    spec = architecture_spec(cfg.model)
    if lines := config_mismatch(ckpt, spec, model):  # a load would fail, or (same shapes) load the wrong model
        raise CheckpointError(
            f"the config in {source} does not match its weights ({'; '.join(lines[:4])}); {mismatch_advice(ckpt, spec)}"
        )
    weights, _ = checkpoint.inference_weights(ckpt, raw=raw)
    if not raw and (why := checkpoint.ema_skipped(ckpt)):
        log.warning("%s: %s.", source, why)
    model.load_state_dict(weights)
    return model.eval()


def run_evaluation(
    ckpt_path: str | Path,
    overrides: Sequence[str] = (),
    out: str | Path | None = None,
    *,
    raw: bool = False,
    plots: str | Path | None = None,
) -> tuple[dict[str, float], Path, str]:
    """Evaluate a checkpoint (its EMA weights when it has them, unless `raw`); returns the metrics, the
    COCO results file written and which weights ran ("ema" or "raw"). `plots`: a directory for the PR
    curves and the confusion matrix (PNG)."""
    if is_zoo_source(str(ckpt_path)):  # its labels are COCO's 91 ids, not a dataset's classes
        raise ConfigError(
            f"frcnn-evaluate takes a checkpoint or run directory, not {ckpt_path}; predict with it "
            "(frcnn-predict), or evaluate a run fine-tuned from it (init_from=torchvision)"
        )
    path = checkpoint.checkpoint_in(ckpt_path)
    out_path = _results_path(out, path)
    ckpt = checkpoint.load_checkpoint(path)
    cfg = apply_overrides(ckpt["config"], overrides, source=str(path), versions=ckpt.get("versions"))
    # What evaluate lets a user change.
    check_values(cfg, keys=("data", "trainer.batch_size", "trainer.amp_dtype", "eval.backend"))
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
    loader = build_eval_loader(
        data.val, batch_size=cfg.trainer.batch_size, num_workers=resolve_num_workers(cfg.data.num_workers, device)
    )
    dtype = amp_dtype(cfg.trainer.amp, cfg.trainer.amp_dtype, device)
    evaluators: dict[str, Any] = {}
    metrics, results = evaluate(
        model,
        loader,
        coco_gt=data.val.coco,
        label_to_cat_id=data.val.label_to_cat_id,
        device=device,
        with_masks=with_masks,
        autocast_dtype=dtype,
        evaluators=evaluators,
        backend=cfg.eval.backend,
    )
    if plots is not None:
        _write_plots(Path(plots).expanduser(), data.val.coco, evaluators, results)
    # COCO.loadRes adds area / id / iscrowd (and box polygons) to the dicts it is given; write only ours.
    keep = ("image_id", "category_id", "bbox", "score") + (("segmentation",) if with_masks else ())
    results = [{k: r[k] for k in keep if k in r} for r in results]
    try:
        outputs.write_file(out_path, json.dumps(results).encode("utf-8"))
    except OSError as err:
        raise ConfigError(
            f"the detections could not be written to {out_path} ({err.strerror}); give a writable file with --out"
        ) from None
    return metrics, out_path, checkpoint.inference_weights(ckpt, raw=raw)[1]


def _write_plots(out_dir: Path, coco_gt: Any, evaluators: dict[str, Any], results: list[dict[str, Any]]) -> None:
    from frcnn_train.eval_plots import PLOTS_HINT, evaluation_figures, save_figures

    figures = evaluation_figures(coco_gt, evaluators, results)
    if not figures:
        raise ConfigError(f"--plots needs matplotlib, which is not installed; {PLOTS_HINT}")
    try:
        save_figures(figures, out_dir)
    except OSError as err:
        raise ConfigError(
            f"the plots could not be written to {out_dir} ({err.strerror}); give a writable directory with --plots"
        ) from None


def _results_path(out: str | Path | None, ckpt_path: Path) -> Path:
    """Where the COCO results go, checked before any work: --out (a directory gets the default name), else
    beside the checkpoint; anything but an earlier detections file there is refused (outputs.check_file)."""
    name = f"detections_{ckpt_path.stem}.json"
    out_path = Path(out).expanduser() if out else ckpt_path.parent / name
    if out_path.is_dir():
        out_path = out_path / name
    outputs.check_file(
        out_path,
        kind="detections",
        command="frcnn-evaluate",
        example=ckpt_path.parent / name,
        reads={ckpt_path: "the checkpoint it evaluates"},
    )
    return out_path


def build_parser() -> argparse.ArgumentParser:
    """The command's arguments; docs/ generates the command-line reference from it."""
    parser = argparse.ArgumentParser(prog=prog_name("frcnn_train.evaluate"), description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="checkpoint file (or run directory: best.pth, else last.pth)")
    parser.add_argument(
        "overrides", nargs="*", help="data=..., data.*=..., device=..., trainer.batch_size=..., eval.backend=..."
    )
    parser.add_argument(
        "--out", help="COCO results JSON, or a directory for it (default: <ckpt dir>/detections_<ckpt stem>.json)"
    )
    parser.add_argument(
        "--plots", metavar="DIR", help="write per-class PR curves and a confusion matrix (PNG, needs matplotlib) to DIR"
    )
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON instead of a table")
    parser.add_argument(
        "--raw",
        action="store_true",
        help="evaluate the trained weights, not the EMA's (for checkpoints of runs with trainer.ema)",
    )
    return parser


@cli
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    metrics, out, weights = run_evaluation(args.checkpoint, args.overrides, args.out, raw=args.raw, plots=args.plots)
    if args.json:
        plots = {"plots": str(Path(args.plots).expanduser())} if args.plots else {}
        print(json.dumps({"metrics": metrics, "detections": str(out), "weights": weights, **plots}))
    else:
        which = "the EMA weights (--raw: the trained ones)" if weights == "ema" else "the trained weights"
        print(f"{format_table(metrics)}\nweights: {which}\ndetections: {out}")
        if args.plots:
            print(f"plots: {Path(args.plots).expanduser()}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
