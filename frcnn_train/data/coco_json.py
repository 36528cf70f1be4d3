"""COCO instances JSON files: read, shape-checked, and the value checks the dataset shares.

Every problem is one `DataError` sentence naming the file and, where the path came from
a config key, the key to change.
"""

from __future__ import annotations

import contextlib
import gc
import json
import json.decoder
import json.scanner
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from frcnn_train.data.records import PolygonStore
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


def read_annotation_file(path: str | Path, *, key: str | None = None) -> tuple[dict[str, Any], PolygonStore]:
    """load_annotation_file for files of any size: the same dict and the same errors, but each annotation's
    polygons are moved into the returned PolygonStore as the file is read (its 'segmentation' becomes a
    Polygons), instead of staying lists of Python floats: COCO train2017 then takes less memory and time than
    json.load (and pycocotools.COCO) take."""
    path = Path(path).expanduser()
    polygons = PolygonStore()
    data = None
    if path.is_file():
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
            with gc_paused():
                data = _parse_top_level(text, polygons)
        except (ValueError, IndexError, StopIteration, UnicodeDecodeError):
            data = None  # not JSON, or not of the expected layout: json itself says what is wrong, below
    if data is None:
        # The exact message for every problem (and a file of another layout read as it is).
        data, polygons = load_annotation_file(path, key=key), PolygonStore()
    check_coco_dict(data, str(path), key=key)
    return data, polygons


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """No garbage collection inside: reading makes millions of containers, none of them garbage, and every
    collection would walk them all."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


_WHITESPACE = re.compile(r"[ \t\n\r]*")
# Where one annotation may end and the next begin; a parse of the text up to there proves it (see below).
_BETWEEN_OBJECTS = re.compile(r"\}[ \t\n\r]*,[ \t\n\r]*\{")
_CHUNK = 1 << 18  # characters of annotations parsed per scanner call


def _parse_top_level(text: str, polygons: PolygonStore) -> dict[str, Any] | None:
    """The top-level object, its "annotations" list parsed in chunks; ValueError (or IndexError at the end of
    the text) where the text is not one JSON object."""
    scan = json.scanner.make_scanner(json.JSONDecoder())
    skip = _WHITESPACE.match
    pos = skip(text, 0).end()
    if text[pos] != "{":
        return None  # a list or a scalar: load_annotation_file reports it
    pos = skip(text, pos + 1).end()
    data: dict[str, Any] = {}
    if text[pos] == "}":
        pos += 1
    while text[pos - 1] != "}":
        if text[pos] != '"':
            raise ValueError("expected a key")
        name, pos = json.decoder.scanstring(text, pos + 1)
        pos = skip(text, pos).end()
        if text[pos] != ":":
            raise ValueError("expected ':'")
        pos = skip(text, pos + 1).end()
        if name == "annotations" and text[pos] == "[":
            data[name], pos = _parse_annotations(text, pos, scan, polygons)
        else:
            data[name], pos = scan(text, pos)
        pos = skip(text, pos).end()
        if text[pos] not in ",}":
            raise ValueError("expected ',' or '}'")
        pos = skip(text, pos + 1).end() if text[pos] == "," else pos + 1
    if skip(text, pos).end() != len(text):
        raise ValueError("extra data")
    return data


def _parse_annotations(text: str, pos: int, scan: Any, polygons: PolygonStore) -> tuple[list, int]:
    """The annotations list from text[pos] == "[", each annotation's polygons moved into `polygons` as soon
    as its chunk is parsed, so that no more than one chunk's Python floats exist at a time.

    A chunk is the text from an annotation's start to a later "}, {" parsed as one list: it parses only when
    the "}, {" lies between two annotations (one inside a string or a nested object leaves a bracket or a
    string open), so a chunk that parses holds exactly whole annotations. One scanner call per chunk instead
    of one per annotation also shares the key strings among the chunk's annotations."""
    skip = _WHITESPACE.match
    out: list[Any] = []
    pos = skip(text, pos + 1).end()
    if text[pos] == "]":
        return out, pos + 1
    single_until = pos  # after a cut that failed, one annotation at a time until past it
    while True:
        cut = _BETWEEN_OBJECTS.search(text, pos + _CHUNK) if pos >= single_until else None
        chunk = None
        if cut is not None:
            piece = "[" + text[pos : cut.start() + 1] + "]"
            try:
                chunk, end = scan(piece, 0)
                if end != len(piece):  # the list closed before the cut: the cut is past the annotations
                    chunk = None
            except (ValueError, StopIteration):
                chunk = None
            if chunk is None:
                single_until = cut.end()
        chunked = chunk is not None
        if chunked:
            pos = cut.end() - 1  # the next annotation's "{"
        else:
            ann, pos = scan(text, pos)
            chunk = [ann]
        for ann in chunk:
            if isinstance(ann, dict):
                seg = ann.get("segmentation")
                if isinstance(seg, list):
                    stored = polygons.add(seg)
                    if stored is not None:  # else not a list of lists of numbers: the dataset's check says so
                        ann["segmentation"] = stored
        out += chunk
        if chunked:
            continue
        pos = skip(text, pos).end()
        if text[pos] == "]":
            return out, pos + 1
        if text[pos] != ",":
            raise ValueError("expected ',' or ']'")
        pos = skip(text, pos + 1).end()


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
    try:
        if math.isfinite(sum(values)):  # the usual case, in C: no value is NaN or infinite
            return True
    except TypeError:
        pass  # strings, lists: each value on its own below
    for value in values:
        try:
            if not math.isfinite(float(value)):
                return False
        except (TypeError, ValueError):
            pass
    return True
