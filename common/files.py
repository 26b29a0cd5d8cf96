"""Atomic file writes: readers see the old file or the new one, never half of one."""
import contextlib
import json
import math
import os
from pathlib import Path


def _clean(value):
    """NaN/inf -> None (JSON has no such numbers), recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


@contextlib.contextmanager
def atomic_path(path, suffix: str = ""):
    """A temporary path in `path`'s folder for a writer to fill; renamed onto `path` when the block ends
    without an error, removed in every case. `suffix` keeps a file type that writers infer from the name."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomic(path, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same folder and a rename."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path, payload: dict) -> None:
    """`payload` as indented JSON (non-finite floats as null), written atomically."""
    write_text_atomic(path, json.dumps(_clean(payload), indent=2))
