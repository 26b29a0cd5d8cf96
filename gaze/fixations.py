"""Reading and validating fixation CSVs: the GazeMedSeg columns, or any CSV through a column map.

GazeMedSeg (the default): one row per fixation with IMAGE, CURRENT_FIX_INDEX, CURRENT_FIX_X, CURRENT_FIX_Y
(normalised to [0, 1], origin top left), CURRENT_FIX_DURATION (ms), IMAGE_HEIGHT, IMAGE_WIDTH (original
size, `529.0` or `529`), plus columns we do not use. Both the original file (LF, float sizes) and the
re-published variant (CRLF, integer sizes) are accepted.

Generic (`columns=parse_columns("image=...,x=...,y=...,duration=...")`): one row per fixation with an
image id, x, y, and either a duration or start and end times (duration = end - start; any time unit, the
heatmap is min-max normalised), optionally width, height and a fixation index. Coordinates are normalised
(0-1) or pixels of the image (`coords="pixels"`): x_norm = x_px / width, y_norm = y_px / height, the
paper's convention (the canvas pixel is round(x_norm * 768) - 1). Without width/height columns the size
comes from the image file (`image_size`).

The file is read line by line, bounded: UTF-8 only (a BOM is ignored), at most MAX_LINE characters a
line, no quoted field running over a line end. Any bad value or duplicated fixation (same image and
fixation index) raises FixationError naming file, line and value: a wrong gaze map must never be produced
silently.
"""
import csv
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np

from common.errors import UserError

MAX_LINE = 1 << 16  # characters; a fixation row is < 200
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".dcm", ".tif", ".tiff", ".bmp")
COORDS = ("normalized", "pixels")
OUTSIDE = ("error", "drop")


class FixationError(UserError):
    """A problem in a fixation CSV; the message names the file, the line and the value."""


@dataclass(frozen=True)
class ColumnMap:
    """Which CSV column holds each role. None: the role is absent.

    image, x, y are required; exactly one of `duration` or (`start` and `end`); `width` and `height`
    together or not at all; `index` (fixation number within the image) enables the duplicate check.
    Roles listed in `optional` may be missing from the header (then treated as None).
    """
    image: str
    x: str
    y: str
    duration: Optional[str] = None
    start: Optional[str] = None
    end: Optional[str] = None
    width: Optional[str] = None
    height: Optional[str] = None
    index: Optional[str] = None
    optional: Tuple[str, ...] = ()


ROLES = tuple(f.name for f in fields(ColumnMap) if f.name != "optional")
GAZEMEDSEG = ColumnMap(image="IMAGE", x="CURRENT_FIX_X", y="CURRENT_FIX_Y", duration="CURRENT_FIX_DURATION",
                       width="IMAGE_WIDTH", height="IMAGE_HEIGHT", index="CURRENT_FIX_INDEX", optional=("index",))
# the whole header of a GazeMedSeg file, in its order: what the project's simulated fixations are written with
GAZEMEDSEG_COLUMNS = ["IMAGE", "CURRENT_FIX_INDEX", "CURRENT_FIX_X", "CURRENT_FIX_Y", "CURRENT_FIX_DURATION",
                      "CURRENT_FIX_PUPIL", "CURRENT_FIX_START", "IMAGE_HEIGHT", "IMAGE_WIDTH"]
REQUIRED = ("IMAGE", "CURRENT_FIX_X", "CURRENT_FIX_Y", "CURRENT_FIX_DURATION", "IMAGE_HEIGHT", "IMAGE_WIDTH")


def parse_columns(text: str) -> ColumnMap:
    """`role=column,...` (the --columns option) -> ColumnMap; only the named roles are used.

    Args:
        text: e.g. "image=dicom_id,x=x_position,y=y_position,start=t0,end=t1".
    """
    found: Dict[str, str] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        role, eq, name = (s.strip() for s in part.partition("="))
        if not eq or not role or not name:
            raise FixationError(f"--columns: {part!r} is not ROLE=COLUMN (roles: {', '.join(ROLES)})")
        if role not in ROLES:
            raise FixationError(f"--columns: unknown role {role!r}; expected one of {', '.join(ROLES)}")
        if role in found:
            raise FixationError(f"--columns: role {role!r} is given twice")
        twice = next((r for r, n in found.items() if n == name), None)
        if twice is not None:
            raise FixationError(f"--columns: column {name!r} is mapped to two roles, {twice} and {role}; each role "
                                "needs its own column")
        found[role] = name
    missing = [r for r in ("image", "x", "y") if r not in found]
    if missing:
        raise FixationError(f"--columns {text!r}: missing role(s) {', '.join(missing)} (image, x and y are required)")
    timed = ("start" in found) + ("end" in found)
    if ("duration" in found) == bool(timed) or timed == 1:
        raise FixationError(f"--columns {text!r}: give either duration=COLUMN or both start=COLUMN and end=COLUMN")
    if ("width" in found) != ("height" in found):
        raise FixationError(f"--columns {text!r}: give width and height together (or neither: sizes are then "
                            "read from the image files)")
    return ColumnMap(**found)


@dataclass
class FixationSet:
    """All fixations of one image, in file order.

    Args:
        id: image id without its extension (`cju0qx73cjw570799j4n5cjze`, `Prostate3T-01-0001_13`).
        xs, ys: normalised coordinates in [0, 1], float64 (K,).
        durations: fixation durations (ms for GazeMedSeg), float64 (K,), all > 0.
        height, width: original image size in pixels.
        lines: 1-based CSV line number of each fixation (the header is line 1), int64 (K,).
        dropped: fixations outside the image that were dropped (outside="drop").
    """

    id: str
    xs: np.ndarray
    ys: np.ndarray
    durations: np.ndarray
    height: int
    width: int
    lines: np.ndarray
    dropped: int = 0

    @property
    def fixations(self) -> np.ndarray:
        """(K, 3) float64 array of x, y, duration: the input of gaze.heatmap.gaze_heatmap."""
        return np.stack([self.xs, self.ys, self.durations], axis=1)


def _number(value: str, column: str, where: str) -> float:
    try:
        v = float(value)
    except ValueError:
        raise FixationError(f"{where}: column {column} value {_short(value)!r} is not a number") from None
    if not math.isfinite(v):
        raise FixationError(f"{where}: column {column} value {value!r} is not a finite number")
    return v


def _size(value: str, column: str, where: str) -> int:
    v = _number(value, column, where)
    if v < 1 or v != int(v):
        raise FixationError(f"{where}: column {column} value {value!r} is not a positive whole number of pixels")
    return int(v)


def _short(s, n: int = 80) -> str:
    s = str(s)
    return s if len(s) <= n else s[:n] + f"... ({len(s)} characters)"


def image_id(name: str) -> str:
    """The image column without an image extension (`abc.jpg` -> `abc`; `a.b-c` stays)."""
    name = name.strip()
    p = Path(name)
    return p.stem if p.suffix.lower() in IMAGE_SUFFIXES else name


def _lines(f, path: Path, count: List[int]) -> Iterator[str]:
    """The file's physical lines, bounded and checked; count[0] = lines read so far."""
    while True:
        try:
            line = f.readline(MAX_LINE + 1)
        except UnicodeDecodeError as e:
            raise FixationError(f"{path}: not UTF-8 text ({e.reason}, byte 0x{e.object[e.start]:02x} at line "
                                f"{count[0] + 1} or the next); save the file as UTF-8 CSV") from None
        if not line:
            return
        count[0] += 1
        if len(line) > MAX_LINE:
            raise FixationError(f"{path}:{count[0]}: line longer than {MAX_LINE} characters (a fixation row is "
                                "short: is this a CSV file with one fixation per line?)")
        if "\x00" in line:
            raise FixationError(f"{path}:{count[0]}: NUL byte (a binary file, or UTF-16 text without a "
                                "byte-order mark?); save the file as UTF-8 CSV")
        yield line


def _rows(path: Path) -> Iterator[Tuple[int, List[str]]]:
    """(line number, fields) of each non-blank row; a row must fit on one physical line."""
    with open(path, "rb") as fb:
        head = fb.read(4)
    if head[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise FixationError(f"{path}: UTF-16 text (it starts with a UTF-16 byte-order mark); save it as UTF-8 CSV")
    with open(path, newline="", encoding="utf-8-sig") as f:
        count = [0]
        reader = csv.reader(_lines(f, path, count), strict=True)
        while True:
            first = count[0] + 1
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error:  # an open quote ran to the end of the file or past csv's field size limit
                raise FixationError(f"{path}:{first}: unbalanced '\"': a quoted field runs over the line end") from None
            if count[0] > first:
                raise FixationError(f"{path}:{first}: unbalanced '\"': a quoted field runs over the line end")
            if row and any(v.strip() for v in row):
                yield first, row


def _header_columns(header: List[str], cols: ColumnMap, path: Path) -> Dict[str, int]:
    """role -> column index; a named column missing from the header is an error (unless optional)."""
    idx, missing = {}, []
    for role in ROLES:
        name = getattr(cols, role)
        if name is None:
            continue
        if name in header:
            idx[role] = header.index(name)
        elif role not in cols.optional:
            missing.append(name)
    if missing:
        raise FixationError(f"{path}:1: missing column(s) {', '.join(missing)}; the header is {_short(header, 300)}")
    return idx


def read_fixations(csv_path, columns: Optional[ColumnMap] = None, coords: str = "normalized",
                   image_size: Optional[Callable[[str], Tuple[int, int]]] = None,
                   outside: str = "error") -> "Fixations":
    """Read a fixation CSV into {image id: FixationSet}, validating every row.

    Args:
        csv_path: the CSV file (UTF-8, optional BOM, LF or CRLF line ends).
        columns: the column map (default GAZEMEDSEG).
        coords: "normalized" (0-1) or "pixels" (of the original image; divided by its width / height).
        image_size: id -> (height, width), used when the map has no width/height columns.
        outside: "error" (default) or "drop" for a coordinate outside the image.
    Returns:
        dict id -> FixationSet, ids in order of first appearance (a `Fixations`: `.dropped` counts every
        dropped fixation, `.all_outside` the images left without any).
    Raises:
        FixationError: unreadable text, an over-long line, an unbalanced quote, missing columns, a row
            with the wrong number of fields, a non-numeric value, a coordinate outside the image, a
            duration <= 0, a repeated (image, fixation index), or two sizes for the same image.
    """
    cols = GAZEMEDSEG if columns is None else columns
    if coords not in COORDS:
        raise FixationError(f"coords must be one of {COORDS}; got {coords!r}")
    if outside not in OUTSIDE:
        raise FixationError(f"outside must be one of {OUTSIDE}; got {outside!r}")
    path = Path(csv_path)
    if path.is_dir():
        raise FixationError(f"{path} is a folder; expected a fixation CSV file")
    if not path.is_file():
        raise FixationError(f"fixation file not found: {path}")
    rows = _rows(path)
    first = next(rows, None)
    if first is None:
        raise FixationError(f"{path}: the file is empty (no header line)")
    header = [h.strip() for h in first[1]]
    col = _header_columns(header, cols, path)
    if "width" not in col and image_size is None:
        raise FixationError(f"{path}: no image width/height columns and no image folder to read the sizes from")

    raw: Dict[str, list] = {}  # id -> list of (x, y, duration, h, w, line)
    seen: Dict[tuple, int] = {}  # (id, fixation index) -> line
    for line, row in rows:
        where = f"{path}:{line}"
        if len(row) != len(header):
            raise FixationError(f"{where}: {len(row)} fields but the header has {len(header)}: {_short(row, 120)}")
        name = row[col["image"]].strip()
        if not name:
            raise FixationError(f"{where}: empty {cols.image} value")
        iid = image_id(name)
        if "index" in col:
            key = (iid, _number(row[col["index"]], cols.index, where))
            if key in seen:
                raise FixationError(f"{where}: image {iid} fixation {cols.index} {row[col['index']].strip()} "
                                    f"is already on line {seen[key]} (duplicated fixation row)")
            seen[key] = line
        x = _number(row[col["x"]], cols.x, where)
        y = _number(row[col["y"]], cols.y, where)
        if "duration" in col:
            d = _number(row[col["duration"]], cols.duration, where)
            if d <= 0:
                raise FixationError(f"{where}: column {cols.duration} value {row[col['duration']]!r} is not positive")
        else:
            t0 = _number(row[col["start"]], cols.start, where)
            t1 = _number(row[col["end"]], cols.end, where)
            d = t1 - t0
            if not d > 0:
                raise FixationError(f"{where}: fixation ends ({cols.end} {row[col['end']]!r}) before or when it "
                                    f"starts ({cols.start} {row[col['start']]!r})")
        h = w = 0
        if "width" in col:
            h = _size(row[col["height"]], cols.height, where)
            w = _size(row[col["width"]], cols.width, where)
        raw.setdefault(iid, []).append((x, y, d, h, w, line))
    if not raw:
        raise FixationError(f"{path}: no fixation rows after the header")
    out = Fixations()
    for iid, rs in raw.items():
        fs, dropped = _fixation_set(iid, rs, path, cols, coords, image_size if "width" not in col else None, outside)
        out.dropped += dropped
        if fs is not None:
            out[iid] = fs
        else:
            out.all_outside.append(iid)
    if not out:
        raise FixationError(f"{path}: every fixation lies outside its image")
    return out


class Fixations(dict):
    """{image id: FixationSet}, with the count of dropped fixations over every image (`outside="drop"`),
    those of images whose fixations were all outside (no FixationSet) included."""

    def __init__(self):
        super().__init__()
        self.dropped = 0
        self.all_outside: List[str] = []


def _fixation_set(iid: str, rs: list, path: Path, cols: ColumnMap, coords: str, image_size, outside: str):
    """One image's rows -> (FixationSet or None when every fixation was dropped, fixations dropped): sizes
    checked, pixels normalised, outside points checked."""
    if image_size is not None:
        h, w = image_size(iid)
        rs = [(x, y, d, h, w, line) for x, y, d, _, _, line in rs]
    first = rs[0]
    bad = next((r for r in rs if (r[3], r[4]) != (first[3], first[4])), None)
    if bad is not None:
        raise FixationError(f"{path}:{bad[5]}: image {iid} has {cols.height} x {cols.width} {bad[3]} x {bad[4]} "
                            f"but line {first[5]} says {first[3]} x {first[4]}")
    a = np.array(rs, dtype=np.float64)
    h, w = int(first[3]), int(first[4])
    if coords == "pixels" and max(h, w) > 2 and ((a[:, :2] >= 0) & (a[:, :2] <= 1)).all():
        raise FixationError(f"{path}:{first[5]}: every {cols.x}, {cols.y} of image {iid} lies within [0, 1], but "
                            f"--coords pixels reads them as pixels of a {w} x {h} (W x H) image: these look like "
                            "normalised coordinates (use --coords normalized)")
    if coords == "pixels":
        a[:, 0] /= w  # x_norm = x_px / width: the paper's convention (canvas index round(x_norm * 768) - 1)
        a[:, 1] /= h
    out = ~((a[:, :2] >= 0) & (a[:, :2] <= 1)).all(axis=1)
    if out.any() and outside == "error":
        k = int(np.argmax(out))
        unit = f"pixels of a {w} x {h} (W x H) image" if coords == "pixels" else "[0, 1]"
        raise FixationError(f"{path}:{rs[k][5]}: {cols.x}, {cols.y} = {rs[k][0]!r}, {rs[k][1]!r} is outside {unit} "
                            "(use --outside drop to drop such fixations)")
    keep = a[~out]
    if not len(keep):
        return None, int(out.sum())
    return FixationSet(id=iid, xs=keep[:, 0], ys=keep[:, 1], durations=keep[:, 2], height=h, width=w,
                       lines=keep[:, 5].astype(np.int64), dropped=int(out.sum())), int(out.sum())
