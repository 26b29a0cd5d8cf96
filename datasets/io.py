"""Reading images, masks and gaze maps from disk, with errors that name the file."""
from pathlib import Path

import numpy as np
from PIL import Image

from common.errors import UserError


class DataError(UserError):
    """A user-fixable problem with input data (missing or unreadable file, bad size...)."""


def _require(path: Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"file not found: {path}{other_extension(path)}")
    return path


def other_extension(path: Path) -> str:
    """A hint when the file exists with another extension (a .png where the dataset spec says .jpg)."""
    import glob
    others = sorted(Path(p).name for p in glob.glob(glob.escape(str(path.with_suffix(""))) + ".*"))
    if not others or path.is_dir():
        return ""
    return (f" (there is {others[0]}: the dataset spec expects {path.suffix} files; give --data a spec whose "
            f"image_ext / mask_ext / gaze_ext match the files)")


def read_dicom(path) -> np.ndarray:
    """DICOM pixel array as float32 (H, W)."""
    import pydicom  # only needed for prostate data

    path = _require(path)
    try:
        return pydicom.dcmread(str(path)).pixel_array.astype(np.float32)
    except Exception as e:  # pydicom raises many types for corrupt files
        raise DataError(f"cannot read DICOM {path}: {e}") from e


def image_size(path) -> tuple:
    """(H, W) from the file header, without decoding pixels."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".dcm":
            import pydicom
            ds = pydicom.dcmread(str(path), stop_before_pixels=True)
            return int(ds.Rows), int(ds.Columns)
        with Image.open(path) as im:
            return im.height, im.width
    except Exception as e:
        raise DataError(f"cannot read image {path}: {e}") from e


GRAY_MODES = ("L", "I;16", "I")  # Pillow modes read as one channel; every other mode is converted to RGB


def image_channels(path) -> int:
    """The channel count `read_image` will return for `path` (1 or 3), from the file header."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".dcm":
            import pydicom
            return 3 if int(getattr(pydicom.dcmread(str(path), stop_before_pixels=True), "SamplesPerPixel", 1)) > 1 \
                else 1
        with Image.open(path) as im:
            return 1 if im.mode in GRAY_MODES else 3
    except Exception as e:
        raise DataError(f"cannot read image {path}: {e}") from e


def read_image(path) -> np.ndarray:
    """An image as stored: RGB uint8 (H, W, 3) for jpg/png colour, (H, W) for gray, float32 (H, W) for dcm."""
    path = _require(path)
    if path.suffix.lower() == ".dcm":
        return read_dicom(path)
    try:
        with Image.open(path) as im:
            im = im.convert("RGB") if im.mode not in GRAY_MODES else im
            return np.asarray(im)
    except Exception as e:
        raise DataError(f"cannot read image {path}: {e}") from e


def read_gray(path) -> np.ndarray:
    """A single-channel file (mask or gaze map) as float32 in [0, 1] (values / 255)."""
    path = _require(path)
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("L"), dtype=np.float32) / 255.0
    except Exception as e:
        raise DataError(f"cannot read {path}: {e}") from e


IGNORE = 255  # the unlabelled value of a label map or training target (losses.IGNORE is the same value)
LABEL_VALUES = (0, 1, IGNORE)  # sparse label maps: background, foreground, unlabelled


def read_labels(path) -> np.ndarray:
    """A sparse label map (ROOT/labels/<kind>/<id>.png) as uint8 (H, W): 0 = background, 1 = foreground,
    255 = unlabelled; any other value is an error naming the file (a lossy format such as JPEG would
    smear the values, so only lossless files are read)."""
    path = _require(path)
    try:
        with Image.open(path) as im:
            if im.format not in ("PNG", "BMP", "TIFF") or im.mode not in ("L", "P", "I", "I;16"):
                raise DataError(f"sparse label map {path}: expected a single-channel lossless image (PNG), "
                                f"got {im.format} mode {im.mode}")
            labels = np.asarray(im)
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"cannot read {path}: {e}") from e
    bad = np.setdiff1d(np.unique(labels), LABEL_VALUES)
    if bad.size:
        raise DataError(f"sparse label map {path} has value(s) {bad[:5].tolist()}; expected only 0 (background), "
                        "1 (foreground) and 255 (unlabelled)")
    return labels.astype(np.uint8)


def dicom_to_uint8_rgb(pixels: np.ndarray) -> np.ndarray:
    """Min-max scale a DICOM slice to 0-255 uint8 and replicate to 3 channels (the CRF's colour input)."""
    lo, hi = float(pixels.min()), float(pixels.max())
    scaled = (pixels - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(pixels)
    return np.repeat(scaled.astype(np.uint8)[..., None], 3, axis=2)


def decoded_size(path) -> tuple:
    """(H, W) after decoding every pixel: a truncated or corrupt file fails here, naming the file.

    Header-only checks (image_size) pass a JPEG cut short; Pillow raises "image file is truncated" only
    when the pixels are decoded.
    """
    path = _require(path)
    if path.suffix.lower() == ".dcm":
        return read_dicom(path).shape[:2]
    try:
        with Image.open(path) as im:
            im.load()
            return im.height, im.width
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError... for corrupt files
        raise DataError(f"cannot decode image {path}: {e}") from e


def read_ids(path) -> list:
    """A split file: one id per line, the whole line (ids may contain spaces) without its surrounding
    whitespace; blank lines skipped, a UTF-8 byte-order mark ignored. An id listed twice is an error.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"split file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (UnicodeDecodeError, OSError) as e:
        raise DataError(f"cannot read split file {path} (expected UTF-8 text, one id per line): {e}") from e
    ids, first_line = [], {}
    for n, line in enumerate(text.splitlines(), start=1):
        i = line.strip()
        if not i:
            continue
        if i in first_line:
            raise DataError(f"{path}:{n}: id '{i}' is listed twice (first on line {first_line[i]})")
        first_line[i] = n
        ids.append(i)
    if not ids:
        raise DataError(f"split file is empty: {path}")
    return ids


def split_line_numbers(path) -> dict:
    """{id: line number} of a split file read by read_ids (for messages that point at a line)."""
    text = Path(path).read_text(encoding="utf-8-sig")
    return {line.strip(): n for n, line in enumerate(text.splitlines(), start=1) if line.strip()}
