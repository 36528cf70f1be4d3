"""init_from: weights from any file into a freshly built model, with a report of what went where.

Accepted files: our checkpoints, torchvision model-zoo files, raw state dicts and
dicts wrapping one under `model`, `state_dict` or `model_state_dict`. Wrapper
prefixes (`module.`, `_orig_mod.`) are stripped, the user's `init.remap` rules
rename keys, and a tensor whose shape differs (another class count) is skipped
so the freshly initialised one stays: fine-tuning to new classes is the common case.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from frcnn_train.checkpoint import FORMAT, inference_weights, migrate, read_file, strip_wrapper_prefixes, unwrap_model
from frcnn_train.errors import CheckpointError, ConfigError

# Keys under which training scripts commonly nest the model's state dict, most specific first.
STATE_KEYS = ("model", "state_dict", "model_state_dict")
WRAPPERS = ("module.", "_orig_mod.")
# BatchNorm's step counter: FrozenBatchNorm2d (torchvision's pretrained default) has none and it
# carries no weights, so its presence or absence is noise in a report and must not fail strict mode.
_COUNTER = "num_batches_tracked"
# A rule's `from` containing none of these is a prefix; "." is left out because every name is dotted.
_REGEX_CHARS = set("\\^$*+?{}[]|()")
# First keys of torchvision classifiers (ResNet, MobileNet): a file holding these is ImageNet weights.
_CLASSIFIER_ROOTS = {"conv1", "bn1", "layer1", "layer4", "fc", "features", "classifier"}
_SHOWN = 5


def module_group(name: str) -> str:
    """The module a tensor reports under (load reports, inspect, architecture diffs): 3 dotted components
    under `backbone`, else 2."""
    # backbone.body.layer2 / backbone.fpn.inner_blocks say more than backbone.body;
    # elsewhere two components already name a head (roi_heads.box_head, rpn.head).
    parts = name.split(".")
    depth = 3 if parts[0] == "backbone" else 2
    return ".".join(parts[: min(depth, len(parts) - 1)]) or name


def extract_state_dict(obj: Any, source: str, *, raw: bool = False) -> tuple[dict[str, Tensor], str]:
    """The tensors of a loaded file and where they were found ("model", "ema", "state_dict", "raw", ...).

    Of our checkpoints, the EMA weights when it has them (checkpoint.inference_weights), unless `raw`.
    """
    if isinstance(obj, nn.Module):  # torch.save(model), only readable with init.trust=true
        return obj.state_dict(), "pickled module"
    if isinstance(obj, dict):
        if obj.get("format") == FORMAT and isinstance(obj.get("model"), dict):  # ours, maybe an older version
            weights, which = inference_weights(migrate(obj, Path(source)), raw=raw)
            return weights, "ema" if which == "ema" else "model"
        for key in STATE_KEYS:
            inner = obj.get(key)
            if isinstance(inner, nn.Module):
                return inner.state_dict(), f"{key} (pickled module)"
            if isinstance(inner, dict) and any(isinstance(v, Tensor) for v in inner.values()):
                return {k: v for k, v in inner.items() if isinstance(v, Tensor)}, key
        tensors = {str(k): v for k, v in obj.items() if isinstance(v, Tensor)}
        if tensors:
            return tensors, "raw"
        shown = ", ".join(map(str, list(obj)[:8])) or "none"
        raise CheckpointError(
            f"{source} holds a dict without tensors (top-level keys: {shown}); give a state dict, "
            f"or a dict with the state dict under one of {', '.join(STATE_KEYS)}"
        )
    raise CheckpointError(
        f"{source} holds a {type(obj).__name__}, not a state dict; give a file saved from "
        "model.state_dict() or an frcnn_train checkpoint"
    )


def wrapper_prefixes(keys: list[str]) -> list[str]:
    """Which of `module.` / `_orig_mod.` appear in the keys (at the start or after a dot)."""
    return [w for w in WRAPPERS if any(k.startswith(w) or f".{w}" in k for k in keys)]


def _compile_rules(remap: list[dict[str, str]]) -> list[tuple[str, str, re.Pattern | None]]:
    rules = []
    for i, rule in enumerate(remap or []):
        if not isinstance(rule, dict) or set(rule) != {"from", "to"}:
            raise ConfigError(f"init.remap[{i}]={rule!r} is not a rule; write each as {{from: old, to: new}}")
        old, new = str(rule["from"]), str(rule["to"] or "")
        if old.endswith(".") or not (_REGEX_CHARS & set(old)):
            rules.append((old, new, None))
            continue
        try:
            rules.append((old, new, re.compile(old)))
        except re.error as err:
            raise ConfigError(
                f"init.remap[{i}].from={old!r} is not a valid regular expression ({err}); "
                "fix it or use a plain prefix ending in '.'"
            ) from None
    return rules


def apply_remap(state: dict[str, Tensor], remap: list[dict[str, str]]) -> dict[str, Tensor]:
    """Rename keys by the ordered rules: prefix renames, or `re.sub` for patterns."""
    rules = _compile_rules(remap)
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        name = key
        for old, new, regex in rules:
            if regex is None:
                name = new + name[len(old) :] if name.startswith(old) else name
            else:
                name = regex.sub(new, name)
        if name in out:
            raise ConfigError(
                f"init.remap maps two tensors of the file to {name!r} (one is {key!r}); make the rules more specific"
            )
        out[name] = value
    return out


@dataclass
class LoadReport:
    """What load_init_weights did with each tensor of the file and of the model."""

    source: str = ""
    container: str = "raw"  # where in the file the state dict was
    stripped: list[str] = field(default_factory=list)  # wrapper prefixes removed
    loaded: list[str] = field(default_factory=list)
    reshaped: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)  # name, file, model
    missing: list[str] = field(default_factory=list)  # in the model, not in the file: newly initialised
    unexpected: list[str] = field(default_factory=list)  # in the file, not in the model: ignored
    order: list[str] = field(default_factory=list, repr=False)  # module groups in state-dict order
    counters: int = 0  # BatchNorm num_batches_tracked in the file: no weights, not reported per tensor

    def counts(self) -> str:
        return (
            f"loaded {len(self.loaded)} | reshaped-and-skipped {len(self.reshaped)} | "
            f"missing {len(self.missing)} | unexpected {len(self.unexpected)}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "container": self.container,
            "stripped": self.stripped,
            "loaded": self.loaded,
            "missing": self.missing,
            "unexpected": self.unexpected,
            "reshaped": [{"name": n, "file": list(a), "model": list(b)} for n, a, b in self.reshaped],
        }

    def format(self) -> str:
        """Counts, then one aligned line per module group, then each skipped tensor by name."""
        table: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
        for column, names in enumerate([self.loaded, [n for n, _, _ in self.reshaped], self.missing, self.unexpected]):
            for name in names:
                table[module_group(name)][column] += 1
        where = f"{self.container} of {self.source}" if self.source else self.container
        notes = [f"stripped {', '.join(self.stripped)}"] * bool(self.stripped)
        notes += [f"{self.counters} BatchNorm {_COUNTER} counters not counted"] * bool(self.counters)
        head = f"{self.counts()}  ({'; '.join([where, *notes])})"
        width = max([len(g) for g in table] + [len("module")])
        lines = [head, f"  {'module':<{width}}  loaded  reshaped  missing  unexpected"]
        for group in sorted(table, key=lambda g: self.order.index(g) if g in self.order else len(self.order)):
            a, b, c, d = table[group]
            lines.append(f"  {group:<{width}}  {a:>6}  {b:>8}  {c:>7}  {d:>10}")
        for name, file_shape, model_shape in self.reshaped:
            lines.append(f"  reshaped, kept new: {name} file {list(file_shape)} -> model {list(model_shape)}")
        for label, names in (("missing, newly initialised", self.missing), ("unexpected, ignored", self.unexpected)):
            if names:
                more = f", ... ({len(names)} in all)" if len(names) > _SHOWN else ""
                lines.append(f"  {label}: {', '.join(names[:_SHOWN])}{more}")
        return "\n".join(lines)


def _roots(keys: list[str]) -> list[str]:
    """Up to two leading module names per key ("backbone.body", "layer1.0", "fc"), first seen first."""
    return list(dict.fromkeys(".".join(k.split(".")[: min(2, k.count("."))]) or k for k in keys))


def _nothing_matches(source: str, file_keys: list[str], model_keys: list[str], report: LoadReport) -> CheckpointError:
    if report.reshaped:
        name, file_shape, model_shape = report.reshaped[0]
        return CheckpointError(
            f"no tensor of {source} fits the model: the {len(report.reshaped)} with matching names all differ in "
            f"shape (e.g. {name} file {list(file_shape)}, model {list(model_shape)}); configure the model the file "
            f"was trained with (backbone, fpn_channels, head sizes); inspect {source} shows them"
        )
    file_roots, model_roots = _roots(file_keys), _roots(model_keys)
    probe = next((k for k in file_keys if not k.endswith(_COUNTER)), file_keys[0] if file_keys else "")
    outer = next((m for m in model_keys if m.endswith("." + probe)), None) if probe else None
    inner = next((m for m in model_keys if probe.endswith("." + m)), None) if probe else None
    if outer:
        hint = f"its names lack a prefix: add it with init.remap=[{{from: '', to: '{outer[: -len(probe)]}'}}]"
    elif inner:
        hint = f"its names carry an extra prefix: drop it with init.remap=[{{from: '{probe[: -len(inner)]}', to: ''}}]"
    else:
        hint = "map its names with init.remap=[{from: <file prefix>, to: <model prefix>}]"
    if {k.split(".")[0] for k in file_keys} & _CLASSIFIER_ROOTS:
        hint = (
            "it looks like a classification backbone (ImageNet weights): "
            f"use model.backbone.weights={source}, or {hint}"
        )
    return CheckpointError(
        f"no tensor of {source} fits the model (file prefixes: {', '.join(file_roots[:6]) or 'none'}; "
        f"model prefixes: {', '.join(model_roots[:6])}); {hint}"
    )


def _strict_error(source: str, report: LoadReport) -> CheckpointError:
    parts = []
    for label, names in (
        ("reshaped", [f"{n} {list(a)}->{list(b)}" for n, a, b in report.reshaped]),
        ("missing", report.missing),
        ("unexpected", report.unexpected),
    ):
        if names:
            more = ", ..." if len(names) > 3 else ""
            parts.append(f"{len(names)} {label} ({', '.join(names[:3])}{more})")
    return CheckpointError(
        f"init.strict=true but {source} does not fit the model exactly: {'; '.join(parts)}; "
        "set init.strict=false to load what fits, or rename keys with init.remap"
    )


def plan_load(model: nn.Module, state: dict[str, Tensor]) -> tuple[dict[str, Tensor], LoadReport]:
    """Match a (prefix-free, remapped) state dict against the model: what loads and what is skipped."""
    own = unwrap_model(model).state_dict()
    report, selected = LoadReport(), {}
    for name, target in own.items():
        if name not in state:
            if not name.endswith(_COUNTER):
                report.missing.append(name)
            continue
        tensor = state[name]
        if tuple(tensor.shape) != tuple(target.shape):
            report.reshaped.append((name, tuple(tensor.shape), tuple(target.shape)))
            continue
        selected[name] = tensor
        if not name.endswith(_COUNTER):
            report.loaded.append(name)
    report.unexpected = [k for k in state if k not in own and not k.endswith(_COUNTER)]
    report.counters = sum(k.endswith(_COUNTER) for k in state)
    report.order = list(dict.fromkeys(module_group(k) for k in [*own, *report.unexpected]))
    return selected, report


def read_state_dict(
    path: str | Path, *, trust: bool = False, raw: bool = False
) -> tuple[dict[str, Tensor], str, list[str]]:
    """(prefix-free tensors, container, stripped wrapper prefixes) of any weights file (`raw`: see extract_state_dict)."""
    tensors, container = extract_state_dict(read_file(path, trust=trust), str(path), raw=raw)
    return strip_wrapper_prefixes(tensors), container, wrapper_prefixes(list(tensors))


def load_init_weights(
    model: nn.Module,
    path: str | Path,
    *,
    remap: list[dict[str, str]],
    strict: bool,
    trust: bool,
    raw: bool = False,
) -> LoadReport:
    """Copy every tensor of `path` that fits into `model` (parameters and buffers); return the report.

    Raises CheckpointError when nothing fits, or when `strict` and anything was
    reshaped, missing or unexpected; the model is untouched in both cases.
    """
    source = str(path)
    state, container, stripped = read_state_dict(path, trust=trust, raw=raw)
    state = apply_remap(state, list(remap or []))
    selected, report = plan_load(model, state)
    report.source, report.container, report.stripped = source, container, stripped
    if not report.loaded:
        raise _nothing_matches(source, list(state), list(unwrap_model(model).state_dict()), report)
    if strict and (report.reshaped or report.missing or report.unexpected):
        raise _strict_error(source, report)
    with torch.no_grad():
        unwrap_model(model).load_state_dict(selected, strict=False)
    return report
