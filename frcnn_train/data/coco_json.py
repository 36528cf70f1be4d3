"""COCO instances JSON files: read, shape-checked, and the value checks the dataset shares.

Every problem is one `DataError` sentence naming the file and, where the path came from
a config key, the key to change.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from frcnn_train.errors import DataError


def fix_hint(key: str | None, what: str) -> str:
    return f"point {key} at another {what}" if key else f"use another {what}"


def key_prefix(key: str | None) -> str:
    return f"{key}: " if key else ""


def load_annotation_file(path: str | Path, *, key: str | None = None) -> dict[str, Any]:
    """Read and shape-check a COCO instances JSON file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(
            f"{key_prefix(key)}annotation file {path} does not exist; check the path or {fix_hint(key, 'file')}"
        )
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(
            f"{key_prefix(key)}{path} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); "
            f"fix the file or {fix_hint(key, 'file')}"
        ) from None
    except UnicodeDecodeError as e:
        raise DataError(
            f"{key_prefix(key)}{path} is not UTF-8 text ({e.reason}); fix the file or {fix_hint(key, 'file')}"
        ) from None
    check_coco_dict(data, str(path), key=key)
    return data


def check_coco_dict(data: Any, source: str, *, key: str | None = None) -> None:
    if not isinstance(data, dict):
        raise DataError(
            f"{key_prefix(key)}{source} holds a JSON {type(data).__name__}, not a COCO object with "
            f"'images', 'annotations' and 'categories'; {fix_hint(key, 'file')}"
        )
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data.get(k), list)]
    if missing:
        raise DataError(
            f"{key_prefix(key)}{source} has no {' / '.join(repr(k) for k in missing)} list, so it is not a COCO "
            f"instances file; {fix_hint(key, 'file')}"
        )


def finite_numbers(values: Any) -> bool:
    """False when a list holds a number (or numeric string) that is NaN or infinite; anything else is
    left to the checks that follow."""
    if not isinstance(values, list):
        return True
    for value in values:
        try:
            if not math.isfinite(float(value)):
                return False
        except (TypeError, ValueError):
            pass
    return True
