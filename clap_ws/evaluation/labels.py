"""Which class each library item belongs to, and which captions describe which files.

Raises :class:`~clap_ws.errors.ClapError` (``bad_request``) with the problem
named, before anything is computed or written.
"""

from __future__ import annotations

import csv
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from ..errors import ClapError, ErrorCode


@dataclass
class Labelled:
    """The items kept for evaluation (indices into the library), their class ids and class names."""

    items: np.ndarray
    labels: np.ndarray
    names: list[str]
    dropped_classes: dict[str, int]  # classes with fewer than 2 items: left out, with their counts
    unlabelled: int  # items no label could be read from


def label_of(path: str, rule: str) -> str | None:
    """``folder``: the item's own folder name; otherwise a regular expression searched in the path, whose
    named group ``label``, else first group, else whole match is the label."""
    if rule == "folder":
        parent = PurePosixPath(path).parent.name
        return parent or None
    match = re.search(rule, path)
    if match is None:
        return None
    if "label" in match.groupdict():
        return match.group("label")
    return match.group(1) if match.groups() else match.group(0)


def labelled(paths: list[str], rule: str = "folder") -> Labelled:
    if rule != "folder":
        try:
            re.compile(rule)
        except re.error as exc:
            raise ClapError(f"--labels {rule!r} is not a regular expression: {exc}", code=ErrorCode.BAD_REQUEST) \
                from None
    found = [label_of(p, rule) for p in paths]
    counts = Counter(label for label in found if label)
    if not counts:
        raise ClapError("no item has a label: " + ("the library's files are not in folders (use --labels REGEX)"
                                                    if rule == "folder" else f"the regex {rule!r} matched no path"),
                        code=ErrorCode.BAD_REQUEST)
    kept = sorted(name for name, n in counts.items() if n >= 2)
    dropped = {name: n for name, n in counts.items() if n < 2}
    if len(kept) < 2:
        raise ClapError(f"evaluation needs at least 2 classes with 2 or more items each; found {len(kept)} "
                        f"({', '.join(f'{k}: {counts[k]}' for k in sorted(counts)) or 'none'})",
                        code=ErrorCode.BAD_REQUEST)
    index = {name: i for i, name in enumerate(kept)}
    items = [i for i, label in enumerate(found) if label in index]
    return Labelled(np.array(items), np.array([index[str(found[i])] for i in items]), kept, dropped,
                    sum(1 for label in found if not label))


def read_captions(path: str | Path, paths: list[str]) -> tuple[list[int], list[str]]:
    """(library item index, caption) per row of a ``path,caption`` CSV (several rows per file allowed; a header
    row ``path,caption`` is skipped). Unknown paths and empty captions are errors naming the first few."""
    where = {p: i for i, p in enumerate(paths)}
    items, captions, unknown = [], [], []
    try:
        with open(path, newline="", encoding="utf-8") as f:
            for n, row in enumerate(csv.reader(f), start=1):
                if not row or (n == 1 and [c.strip().lower() for c in row[:2]] == ["path", "caption"]):
                    continue
                if len(row) < 2 or not row[1].strip():
                    raise ClapError(f"{path}, line {n}: expected path,caption", code=ErrorCode.BAD_REQUEST)
                if row[0] not in where:
                    unknown.append(row[0])
                    continue
                items.append(where[row[0]])
                captions.append(row[1].strip())
    except OSError as exc:
        raise ClapError(f"cannot read captions {path}: {exc}", code=ErrorCode.BAD_REQUEST) from None
    if unknown:
        raise ClapError(f"{len(unknown)} caption row(s) name files that are not in the library, e.g. "
                        f"{', '.join(repr(u) for u in unknown[:3])} (paths are relative to the library's folder)",
                        code=ErrorCode.BAD_REQUEST)
    if len(set(items)) < 2:
        raise ClapError(f"{path} captions fewer than 2 files of the library", code=ErrorCode.BAD_REQUEST)
    return items, captions
