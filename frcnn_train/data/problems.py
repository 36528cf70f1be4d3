"""Every problem of a dataset's files at once, for `frcnn-data check`.

Training stops at the first problem it cannot repair (one DataError sentence). Given a
`Problems` collector, the readers (CocoDetection, load_voc) record each problem instead,
leave the offending image or annotation out and read on, so one check lists them all,
grouped by kind, with what training would do about each.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ERROR, WARNING, NOTE = "error", "warning", "note"

# What training does about each kind: (severity, action). An error stops training; a warning is
# repaired or left out with a warning; a note is what training does silently by design.
REFUSE = "stops with this error"
KINDS: dict[str, tuple[str, str]] = {
    "missing annotation file": (ERROR, REFUSE),
    "unreadable annotation file": (ERROR, REFUSE),
    "missing image file": (ERROR, REFUSE),
    "malformed image entry": (ERROR, REFUSE),
    "duplicate image id": (ERROR, REFUSE),
    "undecodable image": (ERROR, REFUSE),
    "image size differs from the annotations": (ERROR, REFUSE),
    "image values without a scale": (ERROR, REFUSE),
    "malformed annotation": (ERROR, REFUSE),
    "duplicate annotation id": (ERROR, REFUSE),
    "annotation of an unknown image": (ERROR, REFUSE),
    "unknown category id": (ERROR, REFUSE),
    "non-finite box": (ERROR, REFUSE),
    "missing segmentation": (ERROR, REFUSE),
    "malformed segmentation": (ERROR, REFUSE),
    "empty split": (ERROR, REFUSE),
    "unknown class name": (ERROR, REFUSE),
    "box partly outside its image": (WARNING, "clips the box to the image"),
    "box empty after clipping": (WARNING, "drops the annotation"),
    "polygon of fewer than 3 points": (WARNING, "drops that polygon (pycocotools would read it as a box)"),
    "object without a usable polygon": (WARNING, "drops the annotation"),
    "undecodable image (data.bad_images=skip)": (WARNING, "drops the image"),
    "EXIF orientation applied": (NOTE, "turns the image as it is displayed, to match the annotations"),
    "image without training targets": (NOTE, "leaves the image out (data.skip_empty=true)"),
    "crowd region": (NOTE, "takes none as a target; COCOeval ignores detections there"),
}


@dataclass
class Group:
    kind: str
    severity: str
    action: str
    count: int = 0
    first: list[Any] = field(default_factory=list)  # the first ids (image or annotation)
    example: str = ""  # the sentence training would print for the first one


class Problems:
    """A collector of problems per kind, each with a count, the first `keep` ids and one example sentence."""

    def __init__(self, keep: int = 5) -> None:
        self.keep = keep
        self.groups: dict[str, Group] = {}

    def add(self, kind: str, ident: Any, sentence: str = "") -> None:
        severity, action = KINDS.get(kind, (ERROR, REFUSE))
        group = self.groups.setdefault(kind, Group(kind, severity, action))
        group.count += 1
        if len(group.first) < self.keep:
            group.first.append(ident)
        if not group.example and sentence:
            group.example = sentence

    def count(self, severity: str) -> int:
        return sum(g.count for g in self.groups.values() if g.severity == severity)

    def exit_code(self) -> int:
        """0 clean (notes only), 1 warnings only, 2 any error: what `frcnn-data check` exits with."""
        return 2 if self.count(ERROR) else 1 if self.count(WARNING) else 0

    def format(self) -> str:
        order = {ERROR: 0, WARNING: 1, NOTE: 2}
        lines = []
        for g in sorted(self.groups.values(), key=lambda g: (order[g.severity], g.kind)):
            ids = ", ".join(str(i) for i in g.first) + (", ..." if g.count > len(g.first) else "")
            lines.append(f"  {g.severity.upper():<7} {g.count:>6} x {g.kind} (first: {ids})")
            lines.append(f"          training {g.action}")
            if g.example and g.severity == ERROR:
                lines.append(f"          e.g. {g.example}")
        return "\n".join(lines) if lines else "  no problems"


def report(problems: Problems | None, kind: str, ident: Any, error: Exception) -> None:
    """Raise `error` as training does (no collector), or record it and let the reader go on."""
    if problems is None:
        raise error
    problems.add(kind, ident, str(error))
