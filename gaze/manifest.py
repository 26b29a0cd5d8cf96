"""OUT/manifest.json: what each gaze map was made from, so that a re-run recomputes exactly the stale maps.

    {"version": 1, "heatmap": {id: key}, "crf": {id: key}}

A heatmap's key hashes its fixations (x, y, duration after parsing and pixel normalisation, in file order),
the image size, sigma, canvas, file format and HEATMAP_CODE. A CRF map's key hashes the bytes of its heatmap
file and of its image file, the CRF parameters, the backend and CRF_CODE. A map is up to date when its file
exists and its recorded key equals the key of the current inputs; a map without an entry (made before the
manifest existed, or by an interrupted run) counts as changed. Bump a *_CODE string whenever the conversion
changes what is written.
"""
import hashlib
import json
from pathlib import Path
from typing import Dict, Optional

import numpy as np

from common.errors import UserError
from common.files import write_json

NAME = "manifest.json"
VERSION = 1
HEATMAP_CODE = "heatmap/1: 768 canvas, scipy gaussian, min-max, cubic resize, uint8(float16 * 255)"
CRF_CODE = "crf/2: uint8(float32 marginal * 255)"  # crf/1 went through float16 like the heatmap


def _digest(parts: dict, *blobs: bytes) -> str:
    h = hashlib.sha256(json.dumps(parts, sort_keys=True).encode())
    for b in blobs:
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()[:32]


def heatmap_key(fixations: np.ndarray, height: int, width: int, sigma: float, canvas: int, ext: str) -> str:
    """Key of a heatmap: its fixations (K, 3) float64, size, sigma, canvas, file format and code version."""
    parts = dict(code=HEATMAP_CODE, height=int(height), width=int(width), sigma=float(sigma), canvas=int(canvas),
                 ext=ext.lower())
    return _digest(parts, np.ascontiguousarray(fixations, dtype="<f8").tobytes())


def crf_key(heatmap: Path, image: Path, params: dict, backend: str) -> str:
    """Key of a CRF map: the bytes of its heatmap and image files, the CRF parameters, backend, code version."""
    parts = dict(code=CRF_CODE, params={k: float(v) for k, v in params.items()}, backend=backend,
                 ext=Path(heatmap).suffix.lower())
    return _digest(parts, Path(heatmap).read_bytes(), Path(image).read_bytes())


class Manifest:
    """The recorded keys of OUT's maps; every change is saved at once (atomically)."""

    def __init__(self, out_dir: Path):
        self.path = Path(out_dir) / NAME
        self.entries: Dict[str, Dict[str, str]] = {}
        self.unreadable: Optional[str] = None  # why an existing manifest was ignored
        if self.path.is_file():
            try:
                raw = json.loads(self.path.read_text(encoding="utf-8"))
                if raw.get("version") != VERSION:
                    raise ValueError(f"version {raw.get('version')!r}, expected {VERSION}")
                self.entries = {k: dict(v) for k, v in raw.items() if k != "version"}
            except (ValueError, AttributeError, TypeError, OSError) as e:
                self.unreadable = f"{self.path}: ignored ({e}); every map counts as changed"

    def get(self, step: str, iid: str) -> Optional[str]:
        return self.entries.get(step, {}).get(iid)

    def forget(self, step: str, ids) -> None:
        """Drop entries before their maps are rewritten: an interrupted rewrite then counts as changed."""
        table = self.entries.setdefault(step, {})
        for i in ids:
            table.pop(i, None)
        self.save()

    def record(self, step: str, keys: Dict[str, str]) -> None:
        if keys:
            self.entries.setdefault(step, {}).update(keys)
            self.save()

    def save(self) -> None:
        try:
            write_json(self.path, {"version": VERSION, **{k: dict(sorted(v.items())) for k, v in self.entries.items()}})
        except OSError as e:
            raise UserError(f"{self.path}: cannot write the manifest: {e.strerror or e}") from None
