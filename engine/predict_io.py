"""What `predict` reads and writes, without torch: the inputs (files and folders), the checks made before any
work, and the output PNGs. Shared by the torch predict (engine.predict) and the onnxruntime one
(release.onnx_predict), so both accept the same inputs and write the same files.

Each input (jpg/png/dcm, or every such file in a folder) gives OUT/<stem>_mask.png (0/255, original size),
OUT/<stem>_overlay.png (the mask's contour on the image; a DICOM slice or 16-bit image min-max scaled) and,
with --save_prob, OUT/<stem>_prob.png (probability * 255, rounded).
"""
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from common.contours import overlay, to_uint8_rgb
from common.errors import USAGE_EXIT, UserError, one_line, report_user_error
from datasets.io import DataError, image_channels, image_size, read_image

SUFFIXES = (".jpg", ".jpeg", ".png", ".dcm")


def _skip_reason(entry: Path) -> str:
    """Why a folder entry is not an input (for the skipped list)."""
    if entry.is_symlink() and not entry.exists():
        return "broken link"
    if entry.is_dir():
        return "folder"
    if not entry.is_file():
        return "not a regular file"
    return "not " + "/".join(s[1:] for s in SUFFIXES)


def list_inputs(inputs: list[str]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """The images to predict and what was passed over.

    Args:
        inputs: files (jpg/jpeg/png/dcm) and folders; a folder gives its files with those suffixes (sorted,
            not recursive). Every image's header is read now, so a bad file fails before any work.
    Returns:
        (files, skipped): skipped lists each other entry of the named folders (other files, subfolders,
        broken links, ...) with the reason.
    Raises:
        DataError: an input that does not exist or has another suffix, a folder without images, two inputs
            with the same stem (their outputs would overwrite each other), an unreadable image header.
    """
    files, skipped = [], []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = []
            for entry in sorted(path.iterdir()):
                if entry.is_file() and entry.suffix.lower() in SUFFIXES:
                    found.append(entry)
                else:
                    skipped.append((entry, _skip_reason(entry)))
            if not found:
                raise DataError(f"no {'/'.join(s[1:] for s in SUFFIXES)} files in folder {path}"
                                + (f" ({summarize_skipped(skipped)})" if skipped else ""))
            files += found
        elif path.is_file():
            if path.suffix.lower() not in SUFFIXES:
                raise DataError(f"unsupported input {path}: expected one of {', '.join(SUFFIXES)}")
            files.append(path)
        elif path.is_symlink():
            raise DataError(f"input not found: {path} is a broken link (to {os.readlink(path)})")
        else:
            raise DataError(f"input not found: {path}")
    stems: dict[str, Path] = {}
    for f in files:
        if f.stem in stems and stems[f.stem] != f:
            raise DataError(f"two inputs share the name {f.stem!r} ({stems[f.stem]} and {f}); their outputs "
                            "would overwrite each other")
        stems[f.stem] = f
        image_size(f)  # a header read: fails now, naming the file, rather than halfway through
    return list(dict.fromkeys(files)), skipped


def summarize_skipped(skipped: list[tuple[Path, str]], show: int = 5) -> str:
    """'skipped N entries: a.txt (not jpg/...), sub (folder), ... (+K more)'."""
    names = ", ".join(f"{p.name} ({why})" for p, why in skipped[:show])
    more = f", ... (+{len(skipped) - show} more)" if len(skipped) > show else ""
    return f"skipped {len(skipped)} {'entry' if len(skipped) == 1 else 'entries'}: {names}{more}"


def check_out_folder(out: Path) -> None:
    """--out must be a folder this process can write into, or a path where one can be created; checked before
    any work (nothing is created here).

    Raises:
        DataError: naming --out, what is in the way and why.
    """
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file, expected a folder (new or existing) for the predictions")
    existing = out
    while not existing.exists():  # the nearest existing ancestor is where the folder would be created
        if existing.is_symlink():
            raise DataError(f"--out {out}: {existing} is a broken link")
        existing = existing.parent
    if not existing.is_dir():
        raise DataError(f"--out {out}: {existing} is a file, so no folder can be created under it")
    try:  # a real write: os.access misses read-only mounts for root and some network file systems
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".predict-write-test-"):
            pass
    except OSError as e:
        what = "cannot write into it" if existing == out else f"cannot create it in {existing}"
        raise DataError(f"--out {out}: {what} ({e.strerror or e})") from None


def check_threshold(threshold: float) -> None:
    """--threshold is a probability strictly between 0 and 1 (0 or 1 would give all-foreground or all-empty
    masks whatever the image)."""
    if not 0 < threshold < 1:  # also false for NaN
        raise DataError(f"--threshold is {threshold}, expected a probability strictly between 0 and 1")


def check_channels(files: list[Path], channels: int, what: str) -> None:
    """Every input has `channels` channels as read (gray/16-bit/DICOM: 1, colour: 3), checked from the headers
    before anything is written; `what` names the model in the message."""
    for f in files:
        found = image_channels(f)
        if found != channels:
            raise DataError(f"{f} has {found} channel(s) but {what} expects {channels}")


def write_prediction(image: np.ndarray, prob: np.ndarray, stem: str, out: Path, threshold: float,
                     save_prob: bool) -> list[Path]:
    """The output PNGs of one image (as `read_image` returned it) and its (H, W) probability map."""
    mask = prob > threshold
    paths = [out / f"{stem}_mask.png", out / f"{stem}_overlay.png"]
    Image.fromarray(mask.astype(np.uint8) * 255).save(paths[0])
    Image.fromarray(overlay(to_uint8_rgb(image), mask)).save(paths[1])
    if save_prob:
        paths.append(out / f"{stem}_prob.png")
        Image.fromarray(np.round(prob * 255).astype(np.uint8)).save(paths[2])
    return paths


def predict_each(files: list[Path], out: Path, prob_of, threshold: float, save_prob: bool,
                 quiet: bool = True) -> list[Path]:
    """For each file: read it, `prob_of(image, path)` -> (H, W) probabilities, write its PNGs; the written paths.

    OUT is created with the first output (a first image that cannot be predicted leaves nothing behind); a later
    image that fails is a UserError saying which images were written.
    """
    written = []
    for k, f in enumerate(files):
        try:
            image = read_image(f)
            prob = prob_of(image, f)
        except UserError as e:
            if not k:
                raise
            raise UserError(f"{one_line(e)}; stopped there: the {k} image(s) before it ({files[0].name} to "
                            f"{files[k - 1].name}) were written to {out}, the {len(files) - k} from it on were "
                            "not") from None
        out.mkdir(parents=True, exist_ok=True)
        paths = write_prediction(image, prob, f.stem, out, threshold, save_prob)
        written += paths
        if not quiet:
            print(f"{f} -> {paths[0].name} ({100 * (prob > threshold).mean():.1f}% foreground)")
    return written


def inputs_with_warning(inputs: list[str]) -> list[Path]:
    """`list_inputs`, with one warning line on stderr for what was passed over."""
    files, skipped = list_inputs(inputs)
    if skipped:
        print(f"warning: {summarize_skipped(skipped)}", file=sys.stderr)
    return files


def run_predict(out: str, body: Callable[[], str]) -> int:
    """Run `body` (the checks, then the predictions; it returns the closing line) with predict's exit statuses:
    a user error is one `error:` line and 2; a write failing after the checks (disk full, a folder named like
    an output) names the output folder."""
    try:
        summary = body()
    except (UserError, FileNotFoundError) as e:
        return report_user_error(e)
    except OSError as e:
        print(f"error: predicting into {out} stopped: {e}", file=sys.stderr)
        return USAGE_EXIT
    print(summary)
    return 0
