"""Small helpers every preparation module shares: split-list writing, warnings, listed failures."""
import sys
from pathlib import Path
from typing import Sequence

from common.files import write_text_atomic
from datasets.io import DataError

MAX_LISTED = 10  # problems listed in one error message


def write_list(path: Path, ids: Sequence[str]) -> None:
    """A split file: one id per line (ids may contain spaces), written atomically."""
    write_text_atomic(path, "".join(f"{i}\n" for i in ids))


def warn(msg: str) -> None:
    """`warning: MSG` on stderr."""
    print(f"warning: {msg}", file=sys.stderr)


def fail_listing(problems: Sequence[str], what: str) -> None:
    """Raise one DataError listing the first MAX_LISTED problems (and how many more), if there are any."""
    if problems:
        shown = "; ".join(problems[:MAX_LISTED])
        more = f"; ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        raise DataError(f"{len(problems)} {what}: {shown}{more}")


def make_out_dir(path, check_only: bool = False) -> Path:
    """Create the output folder PATH (and parents), or fail with one message if it cannot be a folder.

    Args:
        path: the folder to write.
        check_only: only check that PATH is a folder or could be created (nothing is written).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise DataError(f"--out {path} is a file, expected a folder (existing or to create)")
    blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise DataError(f"--out {path}: {blocker} is a file, so the folder cannot be created")
    if not check_only:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DataError(f"--out {path}: cannot create the folder: {e.strerror or e}") from e
    return path
