"""What a command line asks for: the config keys behind each override, group choices included.

A resume compares only these keys with the checkpoint (resume.merge_for_resume), so
a flag left off the command line never counts as a request, and a group choice
(`model=mask_rcnn`, `+experiment=my_trees`, also from a `--config-dir`) counts as
the keys its YAML file sets.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf


def flatten(cfg: DictConfig | dict) -> dict[str, Any]:
    """{"a.b.c": value} for every leaf; lists stay whole values."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}.{key}" if prefix else str(key))
        else:
            out[prefix] = node

    walk(OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg, "")
    return out


def _config_dirs() -> list[Path]:
    """Where group files are found: a Hydra app's file search path (`--config-dir` included), then configs/."""
    from hydra.core.hydra_config import HydraConfig

    dirs: list[Path] = []
    if HydraConfig.initialized():
        dirs = [
            Path(source.path)
            for source in HydraConfig.get().runtime.config_sources
            if source.schema == "file" and source.path
        ]
    from frcnn_train.config import CONFIG_DIR  # config imports this module

    return dirs + [Path(CONFIG_DIR)]


def _package(text: str, group: str) -> str:
    """The node a group file fills: its `# @package` header (`_global_`: the root), else the group's path."""
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        if line.lstrip("# ").startswith("@package"):
            name = line.split("@package", 1)[1].strip()
            return "" if name == "_global_" else name
    return group.replace("/", ".")


def _group_file_keys(group: str, option: str) -> list[str] | None:
    """The config keys that `<group>/<option>.yaml` sets, itself or through the choices it makes.

    Counted: its own values, the options of its own group it includes, and the
    groups it overrides (`override /model: mask_rcnn` in an experiment asks for
    `model.arch`). Not counted: the defaults of its subgroups (`model=mask_rcnn`
    does not ask for the backbone a checkpoint was trained with).
    """
    group = group.strip("/")
    path = next(
        (d / group / f"{option}.yaml" for d in _config_dirs() if (d / group / f"{option}.yaml").is_file()), None
    )
    if path is None:
        return None
    text = path.read_text(encoding="utf-8")
    package = _package(text, group)
    node = OmegaConf.create(text)
    # Unresolved: a file may interpolate keys it does not set (run_name: trees_${seed}).
    own = flatten(OmegaConf.to_container(node, resolve=False))
    keys = [f"{package}.{k}" if package else k for k in own if not k.startswith("defaults")]
    for entry in node.get("defaults", []) or []:
        if isinstance(entry, str):  # another option of this group, or _self_
            chosen = (group, entry) if entry != "_self_" else None
        else:
            ((target, choice),) = entry.items()
            target = str(target).removeprefix("optional ")
            chosen = (target.removeprefix("override ").strip(), str(choice)) if target.startswith("override ") else None
        if chosen:
            keys += _group_file_keys(*chosen) or []
    return keys


def requested_keys(cfg: DictConfig, overrides: Sequence[str]) -> dict[str, Any]:
    """The leaves a user asked for on the command line, with their values in `cfg`.

    `key=value` names one key. A group choice (`model/attention=none`, `model=mask_rcnn`,
    `+experiment=my_trees`, also from a `--config-dir`) names the keys its YAML file sets:
    `model=mask_rcnn` asks for `model.arch`, not for the backbone or attention a
    checkpoint was trained with.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    requested: dict[str, Any] = {}
    flat_cfg = flatten(cfg)
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        path = override.key_or_group.replace("/", ".")
        if path.startswith("hydra"):
            continue
        keys = None if override.is_delete() else _group_file_keys(override.key_or_group, str(override.value()))
        if keys is None and not isinstance(OmegaConf.select(cfg, path), DictConfig):
            if path in flat_cfg:
                requested[path] = flat_cfg[path]
            continue
        for key in keys if keys is not None else [k for k in flat_cfg if k.startswith(path + ".")]:
            if key in flat_cfg:
                requested[key] = flat_cfg[key]
    return requested
