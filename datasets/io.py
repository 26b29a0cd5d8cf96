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
        raise DataError(f"file not found: {path}")
    return path


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


def read_image(path) -> np.ndarray:
    """An image as stored: RGB uint8 (H, W, 3) for jpg/png colour, (H, W) for gray, float32 (H, W) for dcm."""
    path = _require(path)
    if path.suffix.lower() == ".dcm":
        return read_dicom(path)
    try:
        with Image.open(path) as im:
            im = im.convert("RGB") if im.mode not in ("L", "I;16", "I") else im
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


def dicom_to_uint8_rgb(pixels: np.ndarray) -> np.ndarray:
    """Min-max scale a DICOM slice to 0-255 uint8 and replicate to 3 channels (the CRF's colour input)."""
    lo, hi = float(pixels.min()), float(pixels.max())
    scaled = (pixels - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(pixels)
    return np.repeat(scaled.astype(np.uint8)[..., None], 3, axis=2)


def read_ids(path) -> list:
    """A split file: one id per line, first whitespace-separated column; blank lines skipped."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"split file not found: {path}")
    ids = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise DataError(f"split file is empty: {path}")
    return ids
