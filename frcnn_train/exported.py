"""What `inspect` says about an exported file: this project's ONNX or TorchScript export, or someone else's.

frcnn-export stores its metadata (export.build_metadata) in the file: ONNX metadata_props
(strings, lists and numbers as JSON) and the TorchScript extra file `frcnn_train.json`. Both are
read without running or unpickling the model: a TorchScript file is a zip archive whose
`constants.pkl` marks it (torch.load's own test), read with zipfile; an ONNX file is a protobuf,
parsed with onnx (the export extra) when it is installed.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

from frcnn_train.export import TORCHSCRIPT_METADATA

EXPORT_FORMAT = "frcnn_train.export"  # the "format" value export.build_metadata writes
# Shown in this order; any other key the file holds follows.
SHOWN = (
    "arch",
    "classes",
    "fingerprint",
    "weights",
    "frcnn_train_version",
    "checkpoint",
    "global_step",
    "input",
    "input_size",
    "outputs",
)


def describe_exported(path: Path) -> dict[str, Any] | None:
    """The facts about an ONNX or TorchScript file (ours or not), or None when `path` is neither."""
    if zipfile.is_zipfile(path):
        return _torchscript(path)
    return _onnx(path)


def _torchscript(path: Path) -> dict[str, Any] | None:
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        if not any(name.endswith("/constants.pkl") for name in names):
            return None  # a torch.save archive (a checkpoint): not an export
        extra = next((n for n in names if n.endswith(f"/extra/{TORCHSCRIPT_METADATA}")), None)
        text = archive.read(extra).decode("utf-8") if extra else None
    metadata = None
    if text is not None:
        try:
            metadata = json.loads(text)
        except ValueError:
            metadata = None
    return _facts(
        path,
        "TorchScript",
        metadata,
        details={"extra files": [n.split("/extra/", 1)[1] for n in names if "/extra/" in n]},
    )


def _onnx(path: Path) -> dict[str, Any] | None:
    try:
        import onnx
        from google.protobuf.message import DecodeError
    except ImportError:  # without the export extra an ONNX file cannot be told from any other binary file
        return None
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, OSError, RuntimeError):
        return None
    if not proto.ir_version or not proto.graph.node:  # bytes that happen to parse as an empty message
        return None
    metadata: dict[str, Any] = {}
    for prop in proto.metadata_props:
        try:
            metadata[prop.key] = json.loads(prop.value)
        except ValueError:
            metadata[prop.key] = prop.value  # plain strings are stored as they are
    opsets = ", ".join(f"{o.domain or 'ai.onnx'} {o.version}" for o in proto.opset_import)
    details = {
        "producer": f"{proto.producer_name} {proto.producer_version}".strip() or "unknown",
        "opset": opsets,
        "graph inputs": [i.name for i in proto.graph.input],
        "graph outputs": [o.name for o in proto.graph.output],
    }
    return _facts(path, "ONNX", metadata if metadata.get("format") == EXPORT_FORMAT else None, details)


def _facts(path: Path, fmt: str, metadata: dict[str, Any] | None, details: dict[str, Any]) -> dict[str, Any]:
    ours = metadata is not None and metadata.get("format") == EXPORT_FORMAT
    return {
        "kind": "export",
        "path": str(path),
        "format": fmt,
        "frcnn_train": ours,
        "metadata": metadata if ours else None,
        "file": details,
    }


def render_exported(f: dict[str, Any]) -> list[str]:
    rows = [
        (
            "export",
            f"{f['path']} ({f['format']}"
            + (", written by frcnn-export)" if f["frcnn_train"] else ", not written by frcnn-export)"),
        )
    ]
    if not f["frcnn_train"]:
        rows.append(
            (
                "metadata",
                (
                    "none from frcnn_train (no class names, fingerprint or weights record); "
                    "inspect reads these from files frcnn-export wrote"
                ),
            )
        )
    meta = f["metadata"] or {}
    for key in [*SHOWN, *(k for k in meta if k not in SHOWN and k != "format")]:
        if key in meta:
            value = meta[key]
            if key == "classes":
                value = f"{len(value)}: {', '.join(map(str, value))}"
            elif key == "weights":
                value = {"ema": "the EMA weights", "raw": "the trained (raw) weights"}.get(value, value)
            elif key == "input_size":
                value = "any (--dynamic)" if value is None else "x".join(map(str, value))
            elif isinstance(value, list):
                value = ", ".join(map(str, value))
            rows.append((key.replace("frcnn_train_version", "version"), value))
    for key, value in f["file"].items():
        rows.append((key, (", ".join(map(str, value)) or "none") if isinstance(value, list) else value))
    return [f"{label:<14}{value}" for label, value in rows]
