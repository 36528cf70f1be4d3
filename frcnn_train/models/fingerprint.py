"""Architecture identity: what a checkpoint's model is, and what changed when it differs.

The spec holds every `model.*` setting that shapes a tensor or changes the
module tree, flat and keyed by config path, so a refused resume can name the
key. Settings that shape no tensor (image sizes, thresholds, top-n, image
normalisation, `trainable_layers`, the weights path) stay out: changing them
never stops a checkpoint from loading.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from frcnn_train.checkpoint import (
    library_versions,
    strip_wrapper_prefixes,
    unwrap_model,
)
from frcnn_train.models.backbones import resolve_norm, resolve_returned_layers
from frcnn_train.models.builder import check_arch, check_num_classes, check_version
from frcnn_train.weights import module_group

Layout = dict[str, tuple[list[int], str]]

_MAX_EXAMPLES = 3


def _plain(value: Any) -> Any:
    if isinstance(value, DictConfig) or OmegaConf.is_list(value):
        return OmegaConf.to_container(value, resolve=True)
    return value


def architecture_spec(model_cfg: DictConfig) -> dict[str, Any]:
    """Flat {config key: plain value} of everything that decides the model's tensors.

    `norm` and `returned_layers` are resolved (auto / null become what is built),
    so two configs that build the same model get the same spec. Mask-head keys
    appear only for mask_rcnn, where they shape tensors. The head version and the
    v2 box head's keys appear only for v2: keys added after checkpoints were written
    enter the spec only off their old behaviour, so those checkpoints keep their fingerprint.
    """
    arch = check_arch(model_cfg.arch)
    bb = model_cfg.backbone
    returned = None if bb.returned_layers is None else list(bb.returned_layers)
    spec: dict[str, Any] = {
        "model.arch": arch,
        "model.num_classes": check_num_classes(model_cfg.num_classes),
        "model.backbone.name": str(bb.name),
        # bn and syncbn hold the same tensors; syncbn only changes how DDP computes the statistics.
        "model.backbone.norm": resolve_norm(bb.norm, bb.weights).replace("syncbn", "bn"),
        "model.backbone.returned_layers": resolve_returned_layers(bb.name, returned),
        "model.backbone.fpn_channels": int(bb.fpn_channels),
        "model.anchor_sizes": [int(s) for s in model_cfg.anchor_sizes],
        "model.aspect_ratios": [float(r) for r in model_cfg.aspect_ratios],
        "model.box_head_dim": int(model_cfg.box_head_dim),
    }
    if check_version(model_cfg.version) != "v1":
        spec["model.version"] = str(model_cfg.version)
        spec["model.box_head_convs"] = int(model_cfg.box_head_convs)
        spec["model.box_head_conv_dim"] = int(model_cfg.box_head_conv_dim)
    if arch == "mask_rcnn":
        spec["model.mask_head_layers"] = int(model_cfg.mask_head_layers)
        spec["model.mask_head_dim"] = int(model_cfg.mask_head_dim)
    for key in model_cfg.attention:
        if key != "identity_init":  # only the initial values; the layout is the same either way
            spec[f"model.attention.{key}"] = _plain(model_cfg.attention[key])
    return spec


def tensor_layout(model_or_state: nn.Module | dict[str, Tensor]) -> Layout:
    """name -> (shape, dtype) in state-dict order; wrapper prefixes are removed."""
    if isinstance(model_or_state, nn.Module):
        state = unwrap_model(model_or_state).state_dict()
    else:
        state = strip_wrapper_prefixes(model_or_state)
    return {
        name: (list(t.shape), str(t.dtype).removeprefix("torch.")) for name, t in state.items() if isinstance(t, Tensor)
    }


def fingerprint(spec: dict[str, Any], model: nn.Module) -> str:
    """sha256 hex of the canonical spec and the model's state-dict names, shapes and dtypes.

    State-dict order (parameters and buffers interleaved, module by module) is
    used because it is exactly what a checkpoint stores and what loading checks.
    Device and requires_grad are not part of it: a CPU and a GPU build match.
    """
    tensors = [[name, shape, dtype] for name, (shape, dtype) in tensor_layout(model).items()]
    payload = json.dumps({"spec": spec, "tensors": tensors}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def _show(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def diff_specs(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """One line per differing key: `model.box_head_dim: 256 -> 128`, or added / removed."""
    lines = []
    for key in list(old) + [k for k in new if k not in old]:
        if key not in new:
            lines.append(f"{key}: removed (was {_show(old[key])})")
        elif key not in old:
            lines.append(f"{key}: added ({_show(new[key])})")
        elif old[key] != new[key]:
            lines.append(f"{key}: {_show(old[key])} -> {_show(new[key])}")
    return lines


def _module_paths(layout: Mapping[str, Any]) -> set[str]:
    paths = set()
    for name in layout:
        parts = name.split(".")
        paths.update(".".join(parts[:i]) for i in range(1, len(parts)))
    return paths


def _new_module(name: str, other_paths: set[str]) -> str | None:
    """The shallowest module holding `name` that the other side lacks entirely."""
    parts = name.split(".")
    for i in range(1, len(parts)):
        path = ".".join(parts[:i])
        if path not in other_paths:
            return path
    return None


def _shape(shape: Any) -> str:
    return json.dumps(list(shape))


def _as_layout(layout_or_state: Mapping[str, Any]) -> Mapping[str, Any]:
    # Accept raw state dicts too, so callers can diff a file against a model directly.
    if any(isinstance(v, Tensor) for v in layout_or_state.values()):
        return tensor_layout(dict(layout_or_state))
    return layout_or_state


def diff_layouts(old: dict, new: dict) -> list[str]:
    """Short lines, grouped by module, of tensors added, removed, reshaped or retyped.

    Either side may be a `tensor_layout` (lists or tuples, e.g. read back from a
    checkpoint) or a state dict. A tensor whose whole module is new (or gone) is grouped under that module,
    e.g. `backbone.body.layer2.attention: 4 tensors added`; others under the
    first two components (three under `backbone`). At most 3 examples per line.
    """
    old, new = _as_layout(old), _as_layout(new)
    old_paths, new_paths = _module_paths(old), _module_paths(new)
    # (group, kind) -> [(example text, or None when the group itself says it all)]
    groups: dict[tuple[str, str], list[str | None]] = defaultdict(list)

    def add(group: str, kind: str, name: str, detail: str | None) -> None:
        relative = name[len(group) + 1 :] if name.startswith(group + ".") else name
        groups[(group, kind)].append(None if detail is None else f"{relative}{detail}")

    for name in list(old) + [k for k in new if k not in old]:
        if name not in new or name not in old:
            kind, other = ("removed", new_paths) if name not in new else ("added", old_paths)
            whole = _new_module(name, other)
            group = whole if whole is not None and whole.count(".") + 1 >= 2 else module_group(name)
            add(group, kind, name, None if whole == group else "")
            continue
        (old_shape, old_dtype), (new_shape, new_dtype) = old[name], new[name]
        if list(old_shape) != list(new_shape):
            add(module_group(name), "reshaped", name, f" {_shape(old_shape)} -> {_shape(new_shape)}")
        elif old_dtype != new_dtype:
            add(module_group(name), "retyped", name, f" {old_dtype} -> {new_dtype}")

    lines = []
    for (group, kind), examples in groups.items():
        count = len(examples)
        line = f"{group}: {count} tensor{'s' if count != 1 else ''} {kind}"
        shown = [e for e in examples if e is not None]
        if shown:
            more = ", ..." if len(shown) > _MAX_EXAMPLES else ""
            line += f" ({', '.join(shown[:_MAX_EXAMPLES])}{more})"
        lines.append(line)
    return lines


# ---------------------------------------------------------------- a checkpoint's config against its weights
def config_mismatch(ckpt: dict[str, Any], spec: dict[str, Any], model: nn.Module) -> list[str]:
    """How the model built from a checkpoint's config (`spec`, `model`; meta tensors will do) differs from the
    one it saved, [] when it is the same: the spec keys that differ from the saved spec, then the tensors
    that differ from its weights. resume, evaluate (predict, export) and inspect all ask this."""
    saved = ckpt.get("architecture") or {}
    tensors = diff_layouts(tensor_layout(ckpt["model"]), tensor_layout(model))
    if not tensors and saved.get("fingerprint") in (None, fingerprint(spec, model)):
        return []
    keys = diff_specs(saved["spec"], spec) if saved.get("spec") else []
    return keys + tensors or ["same config, different tensors"]


def _release(version: Any) -> str:
    return str(version).split("+")[0]  # 0.29.1+cu130 and 0.29.1 build the same modules


def mismatch_advice(ckpt: dict[str, Any], spec: dict[str, Any]) -> str:
    """What to do about a config_mismatch: another version built the model differently (then: that version),
    or the checkpoint was edited after it was saved (then: the saved values, named)."""
    written, here = ckpt.get("versions") or {}, library_versions()
    other = [name for name in ("frcnn_train", "torchvision") if _release(written.get(name)) != _release(here[name])]
    if other:
        return (
            "it was written by "
            + ", ".join(f"{n} {written.get(n)}" for n in other)
            + f" (here: {', '.join(f'{n} {here[n]}' for n in other)}); use that version"
        )
    same = f"the same frcnn_train {here['frcnn_train']} and torchvision {here['torchvision']} wrote it"
    saved = (ckpt.get("architecture") or {}).get("spec") or {}
    restore = [f"{key}={_show(saved[key])}" for key in saved if key in spec and spec[key] != saved[key]]
    if restore:
        return (
            f"its config was edited after it was saved ({same}): put back {', '.join(restore)} in the "
            "checkpoint's config, the values its weights were saved with"
        )
    return f"its weights or architecture record were edited after it was saved ({same}); use an unedited copy"
