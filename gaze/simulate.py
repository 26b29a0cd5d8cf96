r"""Simulated gaze from masks: fixations in the GazeMedSeg CSV format for a dataset that has masks but no
eye tracker.

    python -m gaze simulate --root ROOT --out fixations.csv [--ids FILE] [--seed N] [--data NAME] [--fit REAL.csv]

then `python -m gaze --csv fixations.csv --root ROOT --data NAME` and training as usual.

The model (each part fitted by `fit_model` to a real fixation file and the masks of its images; the
defaults below are its fit to the GazeMedSeg Kvasir-SEG file, 1000 images, 26 832 fixations):

* fixations per image: N = round(a + b sqrt(A) + e), e ~ Normal(0, s), A = the mask's share of the image
  (the real count grows with the object: correlation 0.77 with sqrt(A) on Kvasir), clipped to the real
  range (least squares; Kvasir: a = 9.28, b = 48.56, s = 7.32, 5 to 99).
* where: the first fixation falls inside the mask with probability p_first (the reader starts from where
  the previous image left the eye, often outside the object), the others with p_inside. An inside
  fixation lands at a relative depth d = distance to the mask edge / the mask's largest such distance,
  drawn from the real histogram of d (10 bins on [0, 1]); an outside one at a distance to the mask,
  relative to sqrt(mask area), drawn from the real histogram of that (log-spaced bins). Within a bin the
  pixel is uniform among the image's pixels in that bin (bins the image lacks are left out and the others
  renormalised), plus a uniform sub-pixel offset. An empty mask gets uniform fixations over the image.
* duration: log-normal, fitted separately inside and outside the mask (inside fixations are longer),
  redrawn below the real minimum (GazeMedSeg drops fixations under 50 ms).
* timing: fixation k starts where k-1 ended plus a gap drawn uniformly from the real Kvasir gaps' quartile
  range (18-28 ms; not refitted by --fit); CURRENT_FIX_PUPIL is written as 0. No step reads either.

What it leaves out: the order of fixations (scan paths), refixations of the same spot, and the image
content (a real reader also looks at distractors such as reflections and instruments); the positions
depend on the mask alone. Related work: FGI trained a gaze-supervised model on simulated ISIC gaze but published no
simulator; this one is fitted to real GazeMedSeg fixations and checked against them (docs/explanation/
simulated-gaze.md gives the comparison).
"""
import argparse
import csv
import json
import sys
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
from scipy import ndimage

from common.dataspec import load_spec
from common.errors import OneLineParser, UserError, command_name, run_cli
from common.files import atomic_path, write_json
from gaze.fixations import GAZEMEDSEG_COLUMNS as CSV_COLUMNS

DEPTH_BINS = tuple(np.round(np.linspace(0, 1, 11), 2).tolist())  # relative depth inside the mask
OUT_BINS = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 100.0)  # distance outside / sqrt(mask area)


class SimulationError(UserError):
    """A bad option or input of `python -m gaze simulate`."""


@dataclass
class GazeModel:
    """The simulation model's parameters (see the module docstring). Defaults: `fit_model` on the GazeMedSeg
    Kvasir-SEG fixations (1000 images) and the Kvasir-SEG masks: aggregate statistics, no image's data."""
    count_a: float = 9.28
    count_b: float = 48.56
    count_sd: float = 7.32
    count_min: int = 5
    count_max: int = 99
    p_first: float = 0.456
    p_inside: float = 0.8863
    depth_probs: List[float] = field(default_factory=lambda: [
        0.0889, 0.1374, 0.1695, 0.1647, 0.139, 0.1065, 0.0777, 0.0591, 0.0392, 0.0181])
    out_probs: List[float] = field(default_factory=lambda: [
        0.0718, 0.0908, 0.1982, 0.1916, 0.1864, 0.1583, 0.0609, 0.0307, 0.0112])
    log_dur_in: List[float] = field(default_factory=lambda: [5.7324, 0.4403])
    log_dur_out: List[float] = field(default_factory=lambda: [5.6053, 0.5136])
    min_duration: float = 50.0
    gap_range: List[float] = field(default_factory=lambda: [18.0, 28.0])
    fitted_on: str = "GazeMedSeg kvasir_fixation.csv (1000 images), Kvasir-SEG masks"


# ---------------------------------------------------------------- geometry
def relative_depth(mask: np.ndarray) -> np.ndarray:
    """Distance of each mask pixel to the mask's edge over the largest such distance (the frame is not an
    edge: a polyp cut by the frame continues beyond it)."""
    depth = ndimage.distance_transform_edt(mask)
    return depth / depth.max() if depth.max() > 0 else depth


def outside_distance(mask: np.ndarray) -> np.ndarray:
    """Distance of each pixel to the mask, over sqrt(mask area) (0 inside)."""
    return ndimage.distance_transform_edt(~mask) / np.sqrt(max(mask.sum(), 1))


def _bin_of(values: np.ndarray, edges: Sequence[float]) -> np.ndarray:
    return np.clip(np.searchsorted(edges, values, side="right") - 1, 0, len(edges) - 2)


# ---------------------------------------------------------------- fit
def fit_model(fixations: Dict[str, "object"], masks: Dict[str, np.ndarray], source: str = "") -> GazeModel:
    """Fit a GazeModel to real fixations ({id: FixationSet}) and their masks ({id: bool (H, W)}); ids
    without a mask or with an empty mask are left out."""
    counts, roots, first_in, rest_in = [], [], [], []
    depth_hist, out_hist = np.zeros(len(DEPTH_BINS) - 1), np.zeros(len(OUT_BINS) - 1)
    dur_in, dur_out = [], []
    for i, fs in fixations.items():
        mask = masks.get(i)
        if mask is None or not mask.any():
            continue
        h, w = mask.shape
        rows = np.minimum((np.asarray(fs.ys) * h).astype(int), h - 1)
        cols = np.minimum((np.asarray(fs.xs) * w).astype(int), w - 1)
        inside = mask[rows, cols]
        counts.append(len(inside))
        roots.append(np.sqrt(mask.mean()))
        first_in.append(inside[0])
        rest_in.extend(inside[1:])
        depth, dist = relative_depth(mask), outside_distance(mask)
        depth_hist += np.bincount(_bin_of(depth[rows[inside], cols[inside]], DEPTH_BINS),
                                  minlength=len(DEPTH_BINS) - 1)
        out_hist += np.bincount(_bin_of(dist[rows[~inside], cols[~inside]], OUT_BINS), minlength=len(OUT_BINS) - 1)
        d = np.asarray(fs.durations, np.float64)
        dur_in.extend(d[inside])
        dur_out.extend(d[~inside])
    if len(counts) < 2 or not dur_in or not dur_out:
        raise SimulationError(f"--fit {source}: too few images with fixations and a non-empty mask to fit "
                              f"({len(counts)}); the fit needs the masks of the file's images in ROOT/masks")
    b, a = np.polyfit(roots, counts, 1)
    resid = np.asarray(counts) - (a + b * np.asarray(roots))
    dur_in, dur_out = np.log(dur_in), np.log(dur_out)
    return GazeModel(
        count_a=round(float(a), 2), count_b=round(float(b), 2), count_sd=round(float(resid.std()), 2),
        count_min=int(min(counts)), count_max=int(max(counts)),
        p_first=round(float(np.mean(first_in)), 4), p_inside=round(float(np.mean(rest_in)), 4),
        depth_probs=np.round(depth_hist / depth_hist.sum(), 4).tolist(),
        out_probs=np.round(out_hist / max(out_hist.sum(), 1), 4).tolist(),
        log_dur_in=[round(float(dur_in.mean()), 4), round(float(dur_in.std()), 4)],
        log_dur_out=[round(float(dur_out.mean()), 4), round(float(dur_out.std()), 4)],
        min_duration=round(float(np.exp(min(dur_in.min(), dur_out.min()))), 1),
        fitted_on=f"{source} ({len(counts)} images)")


# ---------------------------------------------------------------- simulate
class _Bins:
    """The pixels of `region` grouped by the bin of `values` (computed once per image)."""

    def __init__(self, values: np.ndarray, region: np.ndarray, edges, probs):
        flat = np.flatnonzero(region)
        bins = _bin_of(values.ravel()[flat], edges)
        order = np.argsort(bins, kind="stable")
        self.pixels, counts = flat[order], np.bincount(bins, minlength=len(probs))
        self.offsets = np.concatenate([[0], np.cumsum(counts)])
        p = np.where(counts > 0, probs, 0.0)
        if p.sum() <= 0:  # the image has pixels only in bins the real data never used
            p = (counts > 0).astype(float)
        self.p = p / p.sum()

    def pick(self, rng: np.random.Generator, width: int) -> tuple:
        """A pixel (row, col): a bin drawn from the fitted probabilities among the bins present, then uniform in it."""
        k = rng.choice(len(self.p), p=self.p)
        j = self.pixels[self.offsets[k] + rng.integers(self.offsets[k + 1] - self.offsets[k])]
        return int(j // width), int(j % width)


def simulate_image(mask: np.ndarray, model: GazeModel, rng: np.random.Generator) -> np.ndarray:
    """(N, 4) float64 fixations of one image: x, y (normalised to [0, 1)), duration (ms), start (ms)."""
    mask = mask.astype(bool)
    h, w = mask.shape
    n = int(round(model.count_a + model.count_b * np.sqrt(mask.mean()) + rng.normal(0, model.count_sd)))
    n = int(np.clip(n, model.count_min, model.count_max))
    partial = mask.any() and not mask.all()
    if partial:
        inner = _Bins(relative_depth(mask), mask, DEPTH_BINS, model.depth_probs)
        outer = _Bins(outside_distance(mask), ~mask, OUT_BINS, model.out_probs)
    out = np.zeros((n, 4))
    start = float(rng.integers(5, 10))  # the real files start at 7-8 ms
    for k in range(n):
        if partial:
            inside = rng.random() < (model.p_first if k == 0 else model.p_inside)
            r, c = (inner if inside else outer).pick(rng, w)
        else:  # no object (or all object): uniform over the image
            inside = bool(mask.all())
            r, c = int(rng.integers(h)), int(rng.integers(w))
        mu, sd = model.log_dur_in if inside else model.log_dur_out
        duration = 0.0
        while duration < model.min_duration:
            duration = float(np.round(np.exp(rng.normal(mu, sd))))
        out[k] = ((c + rng.random()) / w, (r + rng.random()) / h, duration, start)
        start += duration + float(np.round(rng.uniform(*model.gap_range)))
    return out


def image_rng(seed: int, image_id: str) -> np.random.Generator:
    """One image's generator, from (seed, id) alone: a file does not depend on which other ids it holds."""
    return np.random.default_rng([seed, zlib.crc32(image_id.encode("utf-8")), 1])


def _read_mask(root: Path, spec, image_id: str) -> np.ndarray:
    from datasets.io import read_gray
    return read_gray(root / "masks" / f"{image_id}{spec.mask_ext}") > 0.5


def write_csv(path: Path, rows: list) -> None:
    with atomic_path(path, ".csv") as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(CSV_COLUMNS)
            writer.writerows(rows)


def simulate_csv(root, out, data: str = "kvasir", ids: Optional[Sequence[str]] = None, seed: int = 0,
                 model: Optional[GazeModel] = None) -> dict:
    """Write simulated fixations for `ids` (default: every mask of ROOT/masks) to `out` (GazeMedSeg CSV).
    Returns {"images", "fixations"}."""
    root, spec, model = Path(root), load_spec(data), model or GazeModel()
    if not (root / "masks").is_dir():
        raise SimulationError(f"no masks folder in {root} (simulated gaze is made from ROOT/masks)")
    if ids is None:
        ids = sorted(p.name[:-len(spec.mask_ext)] for p in (root / "masks").glob(f"*{spec.mask_ext}"))
    if not ids:
        raise SimulationError(f"no {spec.mask_ext} masks in {root / 'masks'}")
    rows = []
    for i in ids:
        mask = _read_mask(root, spec, i)
        h, w = mask.shape
        for k, (x, y, d, s) in enumerate(simulate_image(mask, model, image_rng(seed, i)), 1):
            rows.append([f"{i}{spec.image_ext}", k, f"{x:.6f}", f"{y:.6f}", int(d), 0, int(s), f"{h:.1f}", f"{w:.1f}"])
    out = Path(out)
    if out.parent and not out.parent.is_dir():
        raise SimulationError(f"--out {out}: the folder {out.parent} does not exist")
    write_csv(out, rows)
    return {"images": len(ids), "fixations": len(rows)}


def fit_from_file(csv_path, root, data: str = "kvasir") -> GazeModel:
    """Read a real fixation file and the masks of its images in ROOT/masks, and fit the model."""
    from gaze.fixations import read_fixations

    root, spec = Path(root), load_spec(data)
    fixations = read_fixations(csv_path)
    masks = {i: _read_mask(root, spec, i) for i in fixations
             if (root / "masks" / f"{i}{spec.mask_ext}").is_file()}
    return fit_model(fixations, masks, str(csv_path))


# ---------------------------------------------------------------- comparison
def gaze_statistics(fixations: Dict[str, "object"], masks: Dict[str, np.ndarray]) -> dict:
    """What the docs compare between real and simulated gaze: fixations per image (mean, quartiles), the
    share of fixations inside the mask, duration quartiles (ms)."""
    counts, inside, durations = [], [], []
    for i, fs in fixations.items():
        if i not in masks:
            continue
        m = masks[i]
        h, w = m.shape
        rows = np.minimum((np.asarray(fs.ys) * h).astype(int), h - 1)
        cols = np.minimum((np.asarray(fs.xs) * w).astype(int), w - 1)
        counts.append(len(rows))
        inside.extend(m[rows, cols])
        durations.extend(fs.durations)
    q = lambda v: [float(x) for x in np.quantile(v, [0.25, 0.5, 0.75])]
    return {"images": len(counts), "fixations": int(sum(counts)), "per_image_mean": float(np.mean(counts)),
            "per_image_quartiles": q(counts), "inside_share": float(np.mean(inside)),
            "duration_quartiles_ms": q(durations)}


# ---------------------------------------------------------------- CLI
def parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=command_name("python -m gaze") + " simulate", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True, help="dataset root with masks/ (only read)")
    p.add_argument("--out", required=True, help="the fixation CSV to write (GazeMedSeg columns)")
    p.add_argument("--data", default="kvasir", help="dataset spec (name or file): mask and image extensions")
    p.add_argument("--ids", default=None, help="file with one image id per line (default: every mask)")
    p.add_argument("--seed", type=int, default=0, help="seed; each image's generator comes from it and its id")
    p.add_argument("--fit", default=None, metavar="REAL.csv",
                   help="refit the model on this real fixation file (its images' masks must be in ROOT/masks); "
                        "the fitted model is written beside --out as <out>.model.json")
    return p


def _main(argv=None) -> int:
    a = parser().parse_args(argv)
    from datasets.io import read_ids

    model = fit_from_file(a.fit, a.root, a.data) if a.fit else GazeModel()
    ids = read_ids(a.ids) if a.ids else None
    result = simulate_csv(a.root, a.out, a.data, ids, a.seed, model)
    if a.fit:
        write_json(Path(str(a.out) + ".model.json"), asdict(model))
        print(f"gaze simulate: model fitted on {model.fitted_on}: {json.dumps(asdict(model))}")
    print(f"gaze simulate: {result['fixations']} fixations for {result['images']} images -> {a.out} "
          f"(then: python -m gaze --csv {a.out} --root {a.root} --data {a.data})")
    return 0


def main(argv=None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
