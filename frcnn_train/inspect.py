"""`python -m frcnn_train.inspect PATH [PATH2] [key=value ...] [--config] [--keys] [--json]`: what is this file.

One PATH: our checkpoint (counters, model, optimizer groups, history), any other
weights file (key groups, and whether init_from would load it) or a run directory
(every checkpoint, and which one resume=auto picks). Two PATHs, or one with
overrides: what differs. Every fact is collected into a plain dict first, so
`--json` and the text show the same things.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from frcnn_train import checkpoint
from frcnn_train.checkpoint import strip_wrapper_prefixes
from frcnn_train.config import START_KEYS, with_schema
from frcnn_train.errors import CheckpointError, UserError
from frcnn_train.evaluate import compose_overrides
from frcnn_train.evaluation import summary_metrics
from frcnn_train.exported import describe_exported, render_exported
from frcnn_train.models import architecture_spec, build_model, diff_layouts, diff_specs, tensor_layout
from frcnn_train.models.builder import resolve_sites, valid_attention_sites
from frcnn_train.models.fingerprint import config_mismatch
from frcnn_train.overrides import flatten, requested_keys
from frcnn_train.resume import merge_for_resume
from frcnn_train.runtime import cli, prog_name
from frcnn_train.state import PARTS, describe_position
from frcnn_train.weights import extract_state_dict, load_init_weights, module_group, wrapper_prefixes

_STATS = ("running_mean", "running_var", "num_batches_tracked")  # buffers, not parameters


def _values(state: dict[str, Any], names: Any = None) -> int:
    keys = state if names is None else [n for n in names if n in state]
    return sum(state[k].numel() for k in keys if not k.endswith(_STATS))


def _load(path: Path, trust: bool) -> tuple[str, dict[str, Any]]:
    """("checkpoint", migrated ckpt) for ours, else ("weights", {state, container, stripped})."""
    obj = checkpoint.read_file(path, trust=trust)
    if isinstance(obj, dict) and obj.get("format") == checkpoint.FORMAT:
        return "checkpoint", checkpoint.migrate(obj, path)
    raw, container = extract_state_dict(obj, str(path))
    return "weights", {
        "state": strip_wrapper_prefixes(raw),
        "container": container,
        "stripped": wrapper_prefixes(list(raw)),
    }


def _keys(state: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"name": k, "shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")} for k, v in state.items()]


# ---------------------------------------------------------------- one checkpoint
def _resolved_sites(cfg: dict[str, Any]) -> list[str]:
    """The checkpoint's attention sites with groups (`backbone`, `fpn`, ...) expanded, as the model has them."""
    listed = [str(s) for s in cfg.get("model", {}).get("attention", {}).get("sites", [])]
    try:
        return resolve_sites(listed, valid_attention_sites(with_schema(cfg).model))
    except (UserError, OmegaConfBaseException):  # a damaged or foreign config: say what it lists
        return listed


def _config_mismatch(ckpt: dict[str, Any]) -> list[str]:
    """How the model its config builds differs from its weights (resume's check; [] when it matches), built
    on the meta device: no memory, no weights read."""
    if not isinstance(ckpt.get("model"), dict) or not isinstance(ckpt.get("config"), dict):
        return []  # reported as incomplete
    try:
        cfg = with_schema(ckpt["config"])
        with torch.device("meta"):
            model = build_model(cfg.model, read_backbone_weights=False)
        spec = architecture_spec(cfg.model)
    except (UserError, OmegaConfBaseException) as err:
        return [f"its config builds no model ({str(err).splitlines()[0]})"]
    return config_mismatch(ckpt, spec, model)


def describe_checkpoint(path: Path, ckpt: dict[str, Any]) -> dict[str, Any]:
    cfg, counters = ckpt.get("config", {}), ckpt.get("trainer", {})
    model_cfg, state = cfg.get("model", {}), ckpt.get("model", {})
    opt_groups = ckpt.get("optimizer", {}).get("param_groups", [])
    trainable = {n for g in opt_groups for n in g.get("param_names", [])}
    attention = model_cfg.get("attention", {})
    name = counters.get("best_metric_name", cfg.get("trainer", {}).get("best_metric"))
    return {
        "kind": "checkpoint",
        "path": str(path),
        "format": f"{ckpt.get('format')} v{ckpt.get('format_version')}",
        "complete": not [k for k in checkpoint.REQUIRED_KEYS if k not in ckpt],
        "config_mismatch": _config_mismatch(ckpt),
        "parts": [k for k in PARTS if ckpt.get(k) is not None],
        "ema_updates": (ckpt.get("ema") or {}).get("updates"),
        "missing_keys": [k for k in checkpoint.REQUIRED_KEYS if k not in ckpt],
        "created": ckpt.get("created"),
        "versions": ckpt.get("versions", {}),
        "epoch": counters.get("epoch"),
        "global_step": counters.get("global_step"),
        "step_in_epoch": counters.get("step_in_epoch"),
        "best_metric": {"name": name, "value": counters.get("best_metric")},
        "last_metrics": counters.get("last_metrics", {}),
        "arch": model_cfg.get("arch"),
        "backbone": model_cfg.get("backbone", {}).get("name"),
        "version": model_cfg.get("version", "v1"),  # checkpoints from before model.version: v1
        "attention": {"type": attention.get("type", "none"), "sites": _resolved_sites(cfg)},
        "num_classes": len(ckpt.get("classes", [])),
        "classes": list(ckpt.get("classes", [])),
        "parameters": _values(state),
        "trainable_parameters": _values(state, trainable) if trainable else None,
        "tensors": len(state),
        "fingerprint": (ckpt.get("architecture", {}).get("fingerprint") or "none")[:12],
        "optimizer": cfg.get("optim", {}).get("name"),
        "param_groups": [
            {
                "name": g.get("name", f"group{i}"),
                "lr": g.get("lr"),
                "base_lr": g.get("initial_lr"),
                "lr_mult": g.get("lr_mult", 1.0),
                "weight_decay": g.get("weight_decay"),
                "tensors": len(g["params"]),
            }
            for i, g in enumerate(opt_groups)
        ],
        "rules": cfg.get("optim", {}).get("param_groups", []),
        "scheduler": {
            "name": cfg.get("schedule", {}).get("name"),
            "last_step": ckpt.get("scheduler", {}).get("last_epoch"),
        },
        "scaler_scale": (ckpt.get("scaler") or {}).get("scale"),
        "launch": ckpt.get("launch"),
        "history": counters.get("history", []),
    }


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _rows(pairs: list[tuple[str, Any]]) -> list[str]:
    return [f"{label:<14}{value}" for label, value in pairs]


def _table(header: list[str], rows: list[list[Any]], indent: str = "  ") -> list[str]:
    cells = [header] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return [indent + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]


def render_checkpoint(f: dict[str, Any]) -> list[str]:
    best = f["best_metric"]
    classes = ", ".join(f["classes"][:12]) + (", ..." if len(f["classes"]) > 12 else "")
    versions = ", ".join(f"{k} {v}" for k, v in f["versions"].items())
    trainable = f" ({f['trainable_parameters'] / 1e6:.2f}M trainable)" if f["trainable_parameters"] else ""
    sites = ", ".join(f["attention"]["sites"]) or "no sites"
    lines = _rows(
        [
            ("checkpoint", f["path"]),
            (
                "format",
                f"{f['format']}, "
                + (
                    f"INCOMPLETE (missing {', '.join(f['missing_keys'])})"
                    if not f["complete"]
                    else f"config does not match the weights ({'; '.join(f['config_mismatch'][:6])})"
                    if f["config_mismatch"]
                    else "complete"
                ),
            ),
            ("written", f"{f['created']} by {versions}"),
            ("progress", describe_position(f) if f["global_step"] is not None else "unknown"),
            (
                "state",
                ", ".join(f["parts"])
                + (
                    f"; the EMA has {f['ema_updates']} updates"
                    if f["ema_updates"] is not None
                    else "; no EMA (trainer.ema off)"
                ),
            ),
            ("best", f"{best['name']} = {_fmt(best['value'])}" if best["value"] is not None else "none yet"),
            (
                "last metrics",
                "  ".join(f"{k} {v:.4f}" for k, v in summary_metrics(f["last_metrics"]).items()) or "none yet",
            ),
            (
                "model",
                f"{f['arch']} / {f['backbone']}{' (v2 heads)' if f.get('version') == 'v2' else ''}, "
                f"attention {f['attention']['type']} ({sites})",
            ),
            ("classes", f"{f['num_classes']}: {classes}"),
            ("parameters", f"{f['parameters'] / 1e6:.2f}M{trainable} in {f['tensors']} tensors"),
            ("fingerprint", f["fingerprint"]),
            (
                "optimizer",
                f"{f['optimizer']}, {len(f['param_groups'])} param groups"
                + (f" from rules {json.dumps(f['rules'])}" if f["rules"] else ""),
            ),
        ]
    )
    lines += _table(
        ["group", "lr", "x", "weight_decay", "tensors"],
        [[g["name"], g["lr"], g["lr_mult"], g["weight_decay"], g["tensors"]] for g in f["param_groups"]],
    )
    launch = f.get("launch") or {}
    lines += _rows(
        [
            ("scheduler", f"{f['scheduler']['name']}, last step {f['scheduler']['last_step']}"),
            ("scaler", f"scale {f['scaler_scale']:g}" if f["scaler_scale"] is not None else "off"),
            (
                "launched",
                f"{launch['started_at']} on {launch['device']} ({launch['precision']}): {_command(launch['overrides'])}"
                if launch
                else "not recorded (an older checkpoint)",
            ),
            *[("started from", _weights_line(w)) for w in launch.get("weights", [])],
            ("resumes", len(f["history"]) or "none"),
        ]
    )
    for h in f["history"]:
        changes = "; ".join(h.get("changes", [])) or "no changes"
        where = (
            describe_position(h)
            if "step_in_epoch" in h  # records written before it was kept: epochs done
            else f"step {h.get('global_step')} ({h.get('epoch')} epochs done)"
        )
        lines.append(f"  {h.get('resumed_at')} at {where}: {changes}")
        if "overrides" in h:
            lines.append(f"    on {h.get('device')} ({h.get('precision')}): {_command(h['overrides'])}")
    return lines


def _weights_line(record: dict[str, Any]) -> str:
    """A weights file a run started from (launch record): the key's value, torchvision's name, file and checksum."""
    named = f" = {record['weights']}" if record.get("weights") else ""
    return f"{record.get('value')}{named}: {record.get('file')} (sha256 {record.get('sha256')})"


def _command(overrides: list[str]) -> str:
    """The overrides as a shell would take them after `frcnn-train`."""
    return shlex.join(overrides) or "no overrides"


# ---------------------------------------------------------------- foreign weights
def infer_overrides(state: dict[str, Any]) -> dict[str, str]:
    """Config choices a state dict's shapes reveal, as {override key: value}."""
    found: dict[str, str] = {}
    cls = state.get("roi_heads.box_predictor.cls_score.weight")
    if cls is not None:
        found["model.num_classes"] = str(cls.shape[0] - 1)
    if any(k.startswith("roi_heads.mask_predictor.") for k in state):
        found["model"] = "mask_rcnn"
        layers = {k.split(".")[2] for k in state if k.startswith("roi_heads.mask_head.")}
        found["model.mask_head_layers"] = str(len(layers))
        found["model.mask_head_dim"] = str(state["roi_heads.mask_predictor.conv5_mask.weight"].shape[1])
    blocks = [len({k.split(".")[3] for k in state if k.startswith(f"backbone.body.layer{i}.")}) for i in range(1, 5)]
    bottleneck = any(".conv3." in k for k in state if k.startswith("backbone.body.layer"))
    names = {
        (2, 2, 2, 2, False): "resnet18_fpn",
        (3, 4, 6, 3, False): "resnet34_fpn",
        (3, 4, 6, 3, True): "resnet50_fpn",
        (3, 4, 23, 3, True): "resnet101_fpn",
    }
    backbone = names.get((*blocks, bottleneck))
    if backbone is None and "backbone.body.0.0.weight" in state:
        backbone = "mobilenet_v3_fpn" if any(".fc1." in k for k in state) else "mobilenet_v2_fpn"
    if backbone:
        found["model/backbone"] = backbone
    if "rpn.head.conv.1.0.weight" in state:  # torchvision's v2 heads (a two-conv RPN head)
        found["model.version"] = "v2"
        convs = {k.split(".")[2] for k in state if k.startswith("roi_heads.box_head.") and k.endswith(".0.weight")}
        found["model.box_head_convs"] = str(len(convs))
        if convs:
            found["model.box_head_conv_dim"] = str(state["roi_heads.box_head.0.0.weight"].shape[0])
        fc = f"roi_heads.box_head.{len(convs) + 1}.weight"  # after the convs and a Flatten
        if fc in state:
            found["model.box_head_dim"] = str(state[fc].shape[0])
    for key, name in (
        ("model.backbone.fpn_channels", "backbone.fpn.layer_blocks.0.0.weight"),
        ("model.box_head_dim", "roi_heads.box_head.fc6.weight"),
    ):
        if name in state:
            found[key] = str(state[name].shape[0])
    return found


def describe_weights(path: Path, loaded: dict[str, Any], overrides: list[str], trust: bool) -> dict[str, Any]:
    state = loaded["state"]
    groups: dict[str, list[int]] = {}
    for name, tensor in state.items():
        count = groups.setdefault(module_group(name), [0, 0])
        count[0] += 1
        count[1] += tensor.numel()
    given = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    inferred = {k: v for k, v in infer_overrides(state).items() if k not in given and k.replace("/", ".") not in given}
    used = [f"{k}={v}" for k, v in inferred.items()] + list(overrides)
    facts: dict[str, Any] = {
        "kind": "weights",
        "path": str(path),
        "container": loaded["container"],
        "wrappers": loaded["stripped"],
        "tensors": len(state),
        "parameters": _values(state),
        "groups": [{"prefix": g, "tensors": c[0], "values": c[1]} for g, c in groups.items()],
        "inferred": inferred,
        "init_from": {"overrides": used},
    }
    try:
        cfg = compose_overrides(used)
        if cfg.model.num_classes is None:
            cfg.model.num_classes = 1
            facts["init_from"]["note"] = "model.num_classes neither given nor in the file; assumed 1"
        report = load_init_weights(
            build_model(cfg.model),
            path,
            remap=OmegaConf.to_container(cfg.init.remap),
            strict=cfg.init.strict,
            trust=trust,
        )
        facts["init_from"].update(ok=True, counts=report.counts(), report=report.to_dict(), text=report.format())
    except UserError as err:
        facts["init_from"].update(ok=False, error=str(err))
    return facts


def render_weights(f: dict[str, Any]) -> list[str]:
    lines = _rows(
        [
            ("weights", f"{f['path']} (not an frcnn_train checkpoint)"),
            ("state dict", f"{f['container']}; wrapper prefixes: {', '.join(f['wrappers']) or 'none'}"),
            ("parameters", f"{f['parameters'] / 1e6:.2f}M in {f['tensors']} tensors"),
        ]
    )
    lines += _table(["prefix", "tensors", "values"], [[g["prefix"], g["tensors"], g["values"]] for g in f["groups"]])
    init = f["init_from"]
    lines += _rows([("init_from", f"into a model built with: {' '.join(init['overrides']) or 'the default config'}")])
    if "note" in init:
        lines.append(f"  ({init['note']})")
    lines += ["  " + line for line in init["text"].splitlines()] if init["ok"] else [f"  would fail: {init['error']}"]
    return lines


# ---------------------------------------------------------------- run directory
def describe_run_dir(path: Path) -> dict[str, Any]:
    rows = []
    for file in checkpoint.checkpoint_files(path):
        try:
            ckpt = checkpoint.load_checkpoint(file)
        except CheckpointError as err:
            rows.append({"file": file.name, "valid": False, "error": str(err)})
            continue
        counters = ckpt["trainer"]
        name = counters.get("best_metric_name", ckpt["config"].get("trainer", {}).get("best_metric", "bbox/AP"))
        rows.append(
            {
                "file": file.name,
                "valid": True,
                "epoch": counters["epoch"],
                "global_step": counters["global_step"],
                "metric": name,
                "value": counters.get("last_metrics", {}).get(name),
            }
        )
    # resume=auto takes the newest that loads; the rows are already newest first.
    pick = next((r["file"] for r in rows if r["valid"]), None)
    return {"kind": "run_dir", "path": str(path), "checkpoints": rows, "resume_auto": pick}


def render_run_dir(f: dict[str, Any]) -> list[str]:
    metric = next((r["metric"] for r in f["checkpoints"] if r["valid"]), "metric")
    rows = [
        [
            r["file"],
            r.get("epoch", ""),
            r.get("global_step", ""),
            "" if r.get("value") is None else f"{r['value']:.4f}",
            ("ok" if r["valid"] else f"INVALID: {r['error']}")
            + ("  <- resume=auto" if r["file"] == f["resume_auto"] else ""),
        ]
        for r in f["checkpoints"]
    ]
    pick = f["resume_auto"] or "nothing (a new run would start)"
    return (
        _rows([("run directory", f"{f['path']} ({len(rows)} checkpoints, newest first)")])
        + _table(["file", "epoch", "step", metric, "status"], rows)
        + _rows([("resume=auto", pick)])
    )


# ---------------------------------------------------------------- differences
def _config_diff(a: dict[str, Any], b: dict[str, Any]) -> list[dict[str, Any]]:
    fa, fb = flatten(a), flatten(b)
    missing = "<absent>"
    return [
        {"key": k, "a": fa.get(k, missing), "b": fb.get(k, missing)}
        for k in list(fa) + [k for k in fb if k not in fa]
        if fa.get(k, missing) != fb.get(k, missing)
    ]


def _value_diff(state_a: dict[str, Any], state_b: dict[str, Any]) -> list[dict[str, Any]]:
    """Per module group: how many of the tensors both files hold with one shape and dtype differ in value."""
    groups: dict[str, dict[str, Any]] = {}
    for name, a in state_a.items():
        b = state_b.get(name)
        if b is None or a.shape != b.shape or a.dtype != b.dtype:
            continue  # reported under tensors
        group = module_group(name)
        row = groups.setdefault(group, {"group": group, "shared": 0, "differ": 0, "max_abs": 0.0})
        row["shared"] += 1
        if not torch.equal(a, b):
            row["differ"] += 1
            if a.is_floating_point():  # counters such as num_batches_tracked would drown the weights
                row["max_abs"] = max(row["max_abs"], (a.double() - b.double()).abs().max().item())
    return list(groups.values())


def diff_files(a: tuple[Path, str, dict], b: tuple[Path, str, dict]) -> dict[str, Any]:
    (pa, ka, da), (pb, kb, db) = a, b
    state_a = da["model"] if ka == "checkpoint" else da["state"]
    state_b = db["model"] if kb == "checkpoint" else db["state"]
    facts: dict[str, Any] = {
        "kind": "diff",
        "a": str(pa),
        "b": str(pb),
        "config": [],
        "architecture": [],
        "counters": [],
        "tensors": diff_layouts(tensor_layout(state_a), tensor_layout(state_b)),
        "values": _value_diff(state_a, state_b),
    }
    if ka == kb == "checkpoint":
        facts["config"] = _config_diff(da.get("config", {}), db.get("config", {}))
        facts["architecture"] = diff_specs(
            da.get("architecture", {}).get("spec", {}), db.get("architecture", {}).get("spec", {})
        )
        pairs = {
            "classes": (da.get("classes"), db.get("classes")),
            "fingerprint": (da["architecture"].get("fingerprint"), db["architecture"].get("fingerprint")),
        }
        for key in ("epoch", "global_step", "step_in_epoch", "best_metric"):
            pairs[key] = (da.get("trainer", {}).get(key), db.get("trainer", {}).get(key))
        facts["counters"] = [{"key": k, "a": x, "b": y} for k, (x, y) in pairs.items() if x != y]
    return facts


def diff_overrides(path: Path, ckpt: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """The checkpoint's config against itself with `overrides`; and whether resume= would take them."""
    saved = with_schema(ckpt["config"])
    composed = compose_overrides(overrides)
    # Changed on plain containers, then validated: OmegaConf will not assign a dict into a typed list.
    plain = OmegaConf.to_container(saved, resolve=True)
    for key, value in requested_keys(composed, overrides).items():
        if key.split(".")[0] not in START_KEYS:
            *parents, leaf = key.split(".")
            node = plain
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
    changed = with_schema(plain)
    facts: dict[str, Any] = {
        "kind": "diff",
        "a": str(path),
        "b": " ".join(overrides),
        "counters": [],
        "config": _config_diff(ckpt["config"], plain),
    }
    try:
        facts["architecture"] = diff_specs(architecture_spec(saved.model), architecture_spec(changed.model))
        rebuilt = build_model(changed.model, read_backbone_weights=False)
        facts["tensors"] = diff_layouts(tensor_layout(ckpt["model"]), tensor_layout(rebuilt))
    except UserError as err:
        facts["architecture"], facts["tensors"] = [f"the changed model cannot be built: {err}"], []
    try:
        _, changes = merge_for_resume(ckpt["config"], composed, overrides, str(path))
        facts["resume"] = {"accepted": True, "changes": changes}
    except (UserError, OmegaConfBaseException) as err:  # a resume would stop on either
        facts["resume"] = {"accepted": False, "error": str(err).splitlines()[0]}
    return facts


def render_diff(f: dict[str, Any]) -> list[str]:
    lines = _rows([("a", f["a"]), ("b", f["b"])])
    sections = [
        ("config", [[d["key"], f"{_fmt(d['a'])} -> {_fmt(d['b'])}"] for d in f["config"]]),
        ("counters", [[d["key"], f"{_fmt(d['a'])} -> {_fmt(d['b'])}"] for d in f["counters"]]),
    ]
    for title, rows in sections:
        lines.append(f"{title}: {'no differences' if not rows else ''}".rstrip())
        width = max((len(r[0]) for r in rows), default=0)
        lines += [f"  {k:<{width}}  {v}" for k, v in rows]
    for title in ("architecture", "tensors"):
        lines.append(f"{title}: {'no differences' if not f[title] else ''}".rstrip())
        lines += [f"  {line}" for line in f[title]]
    if "values" in f:
        changed = [v for v in f["values"] if v["differ"]]
        shared = sum(v["shared"] for v in f["values"])
        lines.append(
            f"values: {sum(v['differ'] for v in changed)} of {shared} shared tensors differ"
            if changed
            else f"values: all {shared} shared tensors identical"
        )
        if changed:
            lines += _table(
                ["module", "differ", "max |a-b|"],
                [[v["group"], f"{v['differ']}/{v['shared']}", f"{v['max_abs']:.3g}"] for v in changed],
            )
    if "resume" in f:
        r = f["resume"]
        verdict = f"accepted ({'; '.join(r['changes']) or 'no changes'})" if r["accepted"] else f"refused: {r['error']}"
        lines.append(f"resume={f['a']} with these overrides: {verdict}")
    return lines


# ---------------------------------------------------------------- CLI
def inspect_paths(paths: list[str], overrides: list[str], *, trust: bool = False) -> tuple[dict[str, Any], Any]:
    """The facts about the command's paths and overrides, and the loaded file (for --config / --keys)."""
    if not paths or len(paths) > 2:
        raise CheckpointError(
            f"inspect takes one or two paths, got {len(paths)}; "
            "give a checkpoint, a weights file or a run directory (and optionally a second file)"
        )
    loaded = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir() and (len(paths) == 2 or overrides):
            path, _ = checkpoint.newest_valid(path)
            if path is None:
                raise CheckpointError(f"{raw} holds no valid checkpoint to compare; give a checkpoint file")
        elif path.is_dir():
            if not checkpoint.checkpoint_files(path):
                raise CheckpointError(f"{path} holds no .pth file; give a run directory or a checkpoint file")
            return describe_run_dir(path), None
        if path.is_file() and (exported := describe_exported(path)) is not None:
            if len(paths) == 2 or overrides:
                raise CheckpointError(
                    f"{path} is {exported['format']} export, which inspect describes but does not "
                    "compare; give it alone, or compare the checkpoints it was exported from"
                )
            return exported, None
        loaded.append((path, *_load(path, trust)))
    if len(loaded) == 2:
        return diff_files(loaded[0], loaded[1]), None
    path, kind, data = loaded[0]
    if kind == "weights":
        return describe_weights(path, data, overrides, trust), data
    if overrides:
        return diff_overrides(path, data, overrides), data
    return describe_checkpoint(path, data), data


_RENDER = {
    "checkpoint": render_checkpoint,
    "weights": render_weights,
    "run_dir": render_run_dir,
    "diff": render_diff,
    "export": render_exported,
}


def build_parser() -> argparse.ArgumentParser:
    """The command's arguments; docs/ generates the command-line reference from it."""
    parser = argparse.ArgumentParser(prog=prog_name("frcnn_train.inspect"), description=__doc__.splitlines()[0])
    parser.add_argument(
        "items", nargs="+", help="1-2 paths (checkpoint, weights file, run directory), then key=value overrides"
    )
    parser.add_argument("--config", action="store_true", help="print the checkpoint's resolved config as YAML")
    parser.add_argument("--keys", action="store_true", help="list every tensor with its shape and dtype")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument(
        "--trust", action="store_true", help="allow files that need full unpickling (like init.trust=true)"
    )
    return parser


@cli
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = [i for i in args.items if "=" in i]
    paths = [i for i in args.items if "=" not in i]
    trust = args.trust or "init.trust=true" in overrides
    facts, data = inspect_paths(paths, overrides, trust=trust)
    state = None if data is None else data.get("model", data.get("state"))
    if args.keys and state is not None:
        facts["keys"] = _keys(state)
    if args.config and facts["kind"] == "checkpoint":
        facts["config"] = data["config"]
    if args.json:
        return _print(json.dumps(facts, indent=2, default=str))
    lines = _RENDER[facts["kind"]](facts)
    if args.keys and "keys" in facts:
        lines += ["keys:"] + _table(
            ["name", "shape", "dtype"],
            [[k["name"], "x".join(map(str, k["shape"])) or "scalar", k["dtype"]] for k in facts["keys"]],
        )
    if args.config and facts["kind"] == "checkpoint":
        lines += ["config:", OmegaConf.to_yaml(data["config"]).rstrip()]
    return _print("\n".join(lines))


def _print(text: str) -> int:
    """Print to stdout; a reader that closed the pipe early (`| head`) is no error.

    Python's documented recipe (signal module, "Note on SIGPIPE"): point stdout at
    devnull so the interpreter's final flush does not raise again, and exit 1.
    """
    try:
        print(text)
        sys.stdout.flush()
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
