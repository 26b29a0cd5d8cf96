"""SHA-256 checksums of a folder's files in the `sha256sum` format, so `sha256sum -c SHA256SUMS` checks them too."""
import hashlib
from pathlib import Path
from typing import Dict, Iterable

from common.errors import UserError

SUMS_NAME = "SHA256SUMS"
# a release bundle (python run.py export): what --test and predict read from it, and the rest of it
BUNDLE_WEIGHTS, BUNDLE_CARD, BUNDLE_CARD_MD = "weights.pth", "model_card.json", "model_card.md"
BUNDLE_ONNX = "model.onnx"


def is_bundle(folder) -> bool:
    """A folder written by `run.py export` (it has a SHA256SUMS or a model card beside weights or a model)."""
    folder = Path(folder)
    return folder.is_dir() and any((folder / n).is_file() for n in (SUMS_NAME, BUNDLE_CARD)) and \
        any((folder / n).is_file() for n in (BUNDLE_WEIGHTS, BUNDLE_ONNX))


class ChecksumError(UserError):
    """A file whose bytes are not those its folder's SHA256SUMS records (or a missing or malformed list)."""


def sha256_file(path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def sums_text(folder, names: Iterable[str]) -> str:
    """`<hex>  <name>` lines (the text mode of sha256sum) for `names` in `folder`, sorted by name."""
    return "".join(f"{sha256_file(Path(folder) / n)}  {n}\n" for n in sorted(names))


def read_sums(folder) -> Dict[str, str]:
    """{name: hex digest} of FOLDER/SHA256SUMS; a missing file or a bad line is a ChecksumError naming it."""
    path = Path(folder) / SUMS_NAME
    if not path.is_file():
        raise ChecksumError(f"{path} not found: a bundle lists the checksum of each of its files there")
    sums = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ChecksumError(f"cannot read {path}: {e}") from None
    for n, line in enumerate(lines, start=1):
        digest, sep, name = line.partition("  ")
        name = name.lstrip("*")
        if not sep or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest) or not name \
                or "/" in name or name in (".", ".."):
            raise ChecksumError(f"{path}:{n}: expected '<64 hex digits>  <file name>', found {line!r}")
        sums[name] = digest
    return sums


def verify_folder(folder, required: Iterable[str] = ()) -> Dict[str, str]:
    """Check every file SHA256SUMS lists (and that each of `required` is listed); returns the sums.

    Raises:
        ChecksumError: naming the first file that is missing, unlisted or whose digest differs.
    """
    folder = Path(folder)
    sums = read_sums(folder)
    for name in required:
        if name not in sums:
            raise ChecksumError(f"{folder / SUMS_NAME} does not list {name}")
    for name, digest in sums.items():
        path = folder / name
        if not path.is_file():
            raise ChecksumError(f"{path} is missing (listed in {folder / SUMS_NAME})")
        if sha256_file(path) != digest:
            raise ChecksumError(f"{path} does not match its checksum in {folder / SUMS_NAME}: the file was changed "
                                "or damaged after export")
    return sums
