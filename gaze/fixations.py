"""Reading and validating GazeMedSeg fixation CSVs.

One row per fixation: IMAGE, CURRENT_FIX_X, CURRENT_FIX_Y (normalised to [0, 1], origin top left),
CURRENT_FIX_DURATION (ms), IMAGE_HEIGHT, IMAGE_WIDTH (original size, `529.0` or `529`), plus
columns we do not use. Both the original file (LF, float sizes) and the re-published variant
(CRLF, integer sizes) are accepted. Any bad value raises FixationError naming file, line and value:
a wrong gaze map must never be produced silently.
"""
import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.errors import UserError

REQUIRED = ("IMAGE", "CURRENT_FIX_X", "CURRENT_FIX_Y", "CURRENT_FIX_DURATION", "IMAGE_HEIGHT", "IMAGE_WIDTH")


class FixationError(UserError):
    """A problem in a fixation CSV; the message names the file, the line and the value."""


@dataclass
class FixationSet:
    """All fixations of one image, in file order.

    Args:
        id: IMAGE column without its extension (`cju0qx73cjw570799j4n5cjze`, `Prostate3T-01-0001_13`).
        xs, ys: normalised coordinates in [0, 1], float64 (K,).
        durations: fixation durations in ms, float64 (K,), all > 0.
        height, width: original image size in pixels.
        lines: 1-based CSV line number of each fixation (the header is line 1), int64 (K,).
    """

    id: str
    xs: np.ndarray
    ys: np.ndarray
    durations: np.ndarray
    height: int
    width: int
    lines: np.ndarray

    @property
    def fixations(self) -> np.ndarray:
        """(K, 3) float64 array of x, y, duration: the input of gaze.heatmap.gaze_heatmap."""
        return np.stack([self.xs, self.ys, self.durations], axis=1)


def _number(value: str, column: str, where: str) -> float:
    try:
        v = float(value)
    except ValueError:
        raise FixationError(f"{where}: column {column} value {value!r} is not a number") from None
    if not math.isfinite(v):
        raise FixationError(f"{where}: column {column} value {value!r} is not a finite number")
    return v


def _size(value: str, column: str, where: str) -> int:
    v = _number(value, column, where)
    if v < 1 or v != int(v):
        raise FixationError(f"{where}: column {column} value {value!r} is not a positive whole number of pixels")
    return int(v)


def image_id(name: str) -> str:
    """The IMAGE column without its extension (`abc.jpg` -> `abc`)."""
    return Path(name.strip()).stem


def read_fixations(csv_path) -> dict:
    """Read a GazeMedSeg fixation CSV into {image id: FixationSet}, validating every row.

    Args:
        csv_path: the CSV file (UTF-8, optional BOM, LF or CRLF line ends).
    Returns:
        dict id -> FixationSet, ids in order of first appearance.
    Raises:
        FixationError: empty file, missing columns, a row with the wrong number of fields, a
            non-numeric value, a coordinate outside [0, 1], a duration <= 0, or two different
            IMAGE_HEIGHT/IMAGE_WIDTH values for the same image.
    """
    path = Path(csv_path)
    if not path.is_file():
        raise FixationError(f"fixation file not found: {path}")
    rows: dict = {}  # id -> list of (x, y, d, h, w, line)
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or not any(h.strip() for h in header):
            raise FixationError(f"{path}: the file is empty (no header line)")
        header = [h.strip() for h in header]
        missing = [c for c in REQUIRED if c not in header]
        if missing:
            raise FixationError(f"{path}:1: missing column(s) {', '.join(missing)}; the header is {header}")
        col = {c: header.index(c) for c in REQUIRED}
        for row in reader:
            line = reader.line_num
            if not row or not any(v.strip() for v in row):
                continue  # blank line (e.g. a trailing newline)
            where = f"{path}:{line}"
            if len(row) != len(header):
                raise FixationError(f"{where}: {len(row)} fields but the header has {len(header)}: {row}")
            name = row[col["IMAGE"]].strip()
            if not name:
                raise FixationError(f"{where}: empty IMAGE value")
            x = _number(row[col["CURRENT_FIX_X"]], "CURRENT_FIX_X", where)
            y = _number(row[col["CURRENT_FIX_Y"]], "CURRENT_FIX_Y", where)
            d = _number(row[col["CURRENT_FIX_DURATION"]], "CURRENT_FIX_DURATION", where)
            h = _size(row[col["IMAGE_HEIGHT"]], "IMAGE_HEIGHT", where)
            w = _size(row[col["IMAGE_WIDTH"]], "IMAGE_WIDTH", where)
            for c, v in (("CURRENT_FIX_X", x), ("CURRENT_FIX_Y", y)):
                if not 0.0 <= v <= 1.0:
                    raise FixationError(f"{where}: column {c} value {row[col[c]]!r} is outside [0, 1]")
            if d <= 0:
                raise FixationError(f"{where}: column CURRENT_FIX_DURATION value {row[col['CURRENT_FIX_DURATION']]!r} "
                                    "is not positive")
            rows.setdefault(image_id(name), []).append((x, y, d, h, w, line))
    if not rows:
        raise FixationError(f"{path}: no fixation rows after the header")

    out = {}
    for iid, rs in rows.items():
        a = np.array(rs, dtype=np.float64)
        sizes = {(int(h), int(w)) for h, w in a[:, 3:5]}
        if len(sizes) > 1:
            first = rs[0]
            bad = next(r for r in rs if (r[3], r[4]) != (first[3], first[4]))
            raise FixationError(
                f"{path}:{bad[5]}: image {iid} has IMAGE_HEIGHT x IMAGE_WIDTH {bad[3]} x {bad[4]} "
                f"but line {first[5]} says {first[3]} x {first[4]}")
        out[iid] = FixationSet(id=iid, xs=a[:, 0], ys=a[:, 1], durations=a[:, 2], height=rs[0][3],
                               width=rs[0][4], lines=a[:, 5].astype(np.int64))
    return out
