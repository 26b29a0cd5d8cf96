r"""Simulated sparse annotations from masks: points and scribbles, as label maps for `-m sparse_sup`.

    python -m prepare sparse --root ROOT --kind points|scribbles [--seed N] [--data kvasir] [options]

writes ROOT/labels/<kind>/<id>.png (uint8: 0 background, 1 foreground, 255 unlabelled) for the ids of
ROOT/<split>.txt (default train), and a report beside the folder: ROOT/labels/<kind>_report.csv (per image),
<kind>_report.json (totals and the settings) and <kind>_report.png (a few examples).

Protocols (both seeded per image from (seed, id), so a map does not depend on which other ids are made):

* points - the point supervision of Bearman et al., "What's the point: semantic segmentation with point
  supervision" (ECCV 2016): an annotator clicks on each object. Their annotators click once per class
  (or once per instance), and background gets no click (an objectness prior stands in for it). Here
  background is a class that gets points too (a partial loss needs labelled background), each connected
  foreground component gets K foreground points and the background K points per component; each point
  is a disk of radius r (a click has a size on screen).
  Differences: foreground points are drawn uniformly among the component's pixels at least `margin` px
  from its edge (the deepest pixels when the component is thinner), so they sit inside the object
  rather than on its outline, as a click does; background points are drawn outside the mask dilated by
  `gap` px (an annotator clicks clearly outside the object). A disk is clipped to its region, so no
  label ever contradicts the mask.
* scribbles - the scribble generator of WSL4MIS (Luo et al., MICCAI 2022 "Scribble-supervised medical
  image segmentation via dual-branch network and dynamically mixed pseudo labels supervision";
  code/scribbles_generator.py, which WSL4MIS ships for WORD and other datasets; its ACDC scribbles are the
  hand-drawn ones of Valvano et al., TMI 2021): per class, erode the
  region by a random number of iterations (8-connected, in [4, 10], WSL4MIS's default range; only when
  the region has more than 900 px, as there), skeletonize it (Lee's method), and for the foreground
  keep one branch of the skeleton (a walk from an end point that picks a random unvisited neighbour
  at each fork, WSL4MIS's `Cutting_branch`; we keep the longest of 8 such walks, WSL4MIS its one walk,
  which on a blob's skeleton is often a short spur), then thicken by one 8-connected dilation and keep what
  lies inside the class region. The background keeps its whole skeleton (WSL4MIS cuts branches only
  for foreground classes). Differences: the foreground is processed per connected component (every
  component gets a scribble; WSL4MIS keeps the components of its skeleton above 15 px); WSL4MIS then
  shifts the foreground scribble by up to 6 px and rotates it by up to 15 degrees (then masks it),
  which we leave out so that the scribble stays on the skeleton of the eroded object (it only changes
  where a hand-drawn line would wobble, never its label); the background region is the complement of
  the mask dilated by `gap` px (WSL4MIS: the background class itself), so background scribbles stay
  clear of the object's edge.

The report's agreement is the share of labelled pixels whose label equals the mask (1.0 by construction
for these simulations).
"""
import argparse
import math
import shutil
import sys
import zlib
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from common.dataspec import load_spec
from common.files import write_json, write_text_atomic
from datasets.io import IGNORE, DataError, read_gray, read_ids

KINDS = ("points", "scribbles")
EIGHT = ndimage.generate_binary_structure(2, 2)


def components(mask: np.ndarray) -> list:
    """The 8-connected foreground components of a bool mask, largest first, as bool arrays."""
    labelled, n = ndimage.label(mask, EIGHT)
    sizes = ndimage.sum(mask, labelled, range(1, n + 1))
    return [labelled == k + 1 for k in np.argsort(-np.asarray(sizes), kind="stable")]


def disk(shape: tuple, y: int, x: int, radius: int) -> np.ndarray:
    yy, xx = np.ogrid[:shape[0], :shape[1]]
    return (yy - y) ** 2 + (xx - x) ** 2 <= radius ** 2


def _pick(region: np.ndarray, depth: float, count: int, rng: np.random.Generator) -> list:
    """`count` distinct pixels of `region`, uniform among those at least `depth` px from its edge (the
    deepest ones when none is that deep)."""
    dist = ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]  # the image border is an edge too
    ok = dist >= min(depth, dist.max())
    ys, xs = np.nonzero(ok)
    chosen = rng.choice(len(ys), size=min(count, len(ys)), replace=False)
    return [(int(ys[i]), int(xs[i])) for i in chosen]


def background_region(mask: np.ndarray, gap: int) -> np.ndarray:
    """Where background labels may go: outside the mask dilated by `gap` px (outside the mask itself when
    `gap` is 0 or the mask is empty)."""
    return ~ndimage.binary_dilation(mask, EIGHT, iterations=gap) if gap > 0 and mask.any() else ~mask


def simulate_points(mask: np.ndarray, rng: np.random.Generator, count: int = 1, radius: int = 5,
                    margin: int = 10, gap: int = 10) -> np.ndarray:
    """Point labels of a bool mask (H, W): uint8 map, 1 = foreground, 0 = background, 255 = unlabelled.

    Args:
        mask: the object mask.
        rng: the image's random generator.
        count: K, points per foreground component, and background points per component (K for an empty mask).
        radius: disk radius of a point (px).
        margin: foreground points at least radius + margin px from the component's edge where it allows.
        gap: background points outside the mask dilated by `gap` px (and radius px from that region's edge).
    """
    mask = mask.astype(bool)
    out = np.full(mask.shape, IGNORE, np.uint8)
    comps = components(mask)
    for comp in comps:
        for y, x in _pick(comp, radius + margin, count, rng):
            out[disk(mask.shape, y, x, radius) & comp] = 1
    background = background_region(mask, gap)
    if background.any():
        for y, x in _pick(background, radius + 1, count * max(len(comps), 1), rng):
            out[disk(mask.shape, y, x, radius) & background] = 0
    return out


def skeleton(region: np.ndarray) -> np.ndarray:
    """Lee's skeleton of a bool region (WSL4MIS's `skeletonize(..., method='lee')`)."""
    from skimage.morphology import skeletonize
    return skeletonize(region, method="lee") > 0


def _erode(region: np.ndarray, rng: np.random.Generator, erosion: tuple) -> np.ndarray:
    """WSL4MIS: erode by ceil(lo + u (hi - lo)) 8-connected iterations when the region has > 900 px; here
    fewer iterations where that would erase the region."""
    if region.sum() <= 900 or erosion[1] <= 0:
        return region
    n = math.ceil(erosion[0] + rng.random() * (erosion[1] - erosion[0]))
    while n > 0:
        eroded = ndimage.binary_erosion(region, EIGHT, iterations=n)
        if eroded.any():
            return eroded
        n //= 2
    return region


def skeleton_branch(skel: np.ndarray, rng: np.random.Generator, tries: int = 8) -> np.ndarray:
    """One branch of a skeleton (WSL4MIS's Cutting_branch): from an end point (a pixel with one neighbour;
    any pixel for a loop), walk to a random unvisited 8-neighbour until none is left. The longest of
    `tries` walks from random end points is kept (WSL4MIS keeps its one walk, often a short spur)."""
    ys, xs = np.nonzero(skel)
    if len(ys) == 0:
        return skel.copy()
    padded = np.pad(skel, 1)
    neighbours = ndimage.convolve(padded.astype(np.uint8), np.ones((3, 3), np.uint8), mode="constant")[1:-1, 1:-1]
    ends = np.nonzero(skel & (neighbours == 2))  # itself + one neighbour
    starts = list(zip(*ends)) if len(ends[0]) else list(zip(ys, xs))
    steps = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]
    best = None
    for k in rng.permutation(len(starts))[:tries]:
        y, x = (int(v) for v in starts[k])
        out = np.zeros_like(skel)
        out[y, x] = True
        length = 1
        while True:
            free = [(y + dy, x + dx) for dy, dx in steps
                    if padded[y + dy + 1, x + dx + 1] and not out[y + dy, x + dx]]
            if not free:
                break
            y, x = free[int(rng.integers(len(free)))]
            out[y, x] = True
            length += 1
        if best is None or length > best[0]:
            best = (length, out)
    return best[1]


def simulate_scribbles(mask: np.ndarray, rng: np.random.Generator, erosion: tuple = (4, 10), width: int = 1,
                       gap: int = 10) -> np.ndarray:
    """Scribble labels of a bool mask (H, W): uint8 map, 1 = foreground, 0 = background, 255 = unlabelled.

    Args:
        mask: the object mask.
        rng: the image's random generator.
        erosion: range of erosion iterations before skeletonizing (WSL4MIS's default [4, 10]).
        width: 8-connected dilations of the skeleton line (WSL4MIS: 1, a 3-px line).
        gap: the background region is outside the mask dilated by `gap` px.
    """
    mask = mask.astype(bool)
    out = np.full(mask.shape, IGNORE, np.uint8)
    for comp in components(mask):
        line = skeleton_branch(skeleton(_erode(comp, rng, erosion)), rng)
        out[ndimage.binary_dilation(line, EIGHT, iterations=width) & comp if width else line & comp] = 1
    background = background_region(mask, gap)
    if background.any():
        line = skeleton(_erode(background, rng, erosion))
        out[(ndimage.binary_dilation(line, EIGHT, iterations=width) if width else line) & background] = 0
    return out


SIMULATORS = {"points": simulate_points, "scribbles": simulate_scribbles}


def image_rng(seed: int, image_id: str) -> np.random.Generator:
    """The generator of one image: from (seed, id) alone, so the maps do not depend on the order of ids."""
    return np.random.default_rng([seed, zlib.crc32(image_id.encode("utf-8"))])


def label_stats(labels: np.ndarray, mask: np.ndarray) -> dict:
    """Labelled fraction, foreground / background labelled pixels and agreement with the mask (the share of
    labelled pixels whose label equals the mask; NaN when nothing is labelled)."""
    labelled = labels != IGNORE
    n = int(labelled.sum())
    agree = int((labelled & (labels == mask.astype(np.uint8))).sum())
    return {"pixels": int(labels.size), "labelled": n, "foreground": int((labels == 1).sum()),
            "background": int((labels == 0).sum()), "agree": agree,
            "labelled_fraction": n / labels.size, "agreement": agree / n if n else float("nan")}


def total_stats(rows: list) -> dict:
    keys = ("pixels", "labelled", "foreground", "background", "agree")
    tot = {k: sum(r[k] for r in rows) for k in keys}
    tot["images"] = len(rows)
    tot["labelled_fraction"] = tot["labelled"] / tot["pixels"] if tot["pixels"] else float("nan")
    tot["agreement"] = tot["agree"] / tot["labelled"] if tot["labelled"] else float("nan")
    tot["min_agreement"] = min((r["agreement"] for r in rows if r["labelled"]), default=float("nan"))
    tot["images_without_foreground_label"] = sum(1 for r in rows if r["mask_pixels"] and not r["foreground"])
    return tot


def _mask(root: Path, spec, image_id: str) -> np.ndarray:
    return read_gray(root / "masks" / f"{image_id}{spec.mask_ext}") > 0.5


def example_sheet(root: Path, spec, kind: str, ids: list, folder: Path, out: Path, count: int = 6) -> None:
    """A PNG of `count` examples: the image, the mask outline (yellow), foreground labels (green) and
    background labels (red)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from datasets.io import dicom_to_uint8_rgb, read_image

    picked = ids[:: max(1, len(ids) // count)][:count]
    fig, axes = plt.subplots(1, len(picked), figsize=(3 * len(picked), 3.2), squeeze=False)
    for ax, i in zip(axes[0], picked):
        image = read_image(root / "images" / f"{i}{spec.image_ext}")
        rgb = dicom_to_uint8_rgb(image) if image.dtype != np.uint8 else (
            np.repeat(image[..., None], 3, 2) if image.ndim == 2 else image)
        labels = np.asarray(Image.open(folder / f"{i}.png"))
        shown = rgb.copy()
        shown[labels == 1] = (0, 255, 0)
        shown[labels == 0] = (255, 0, 0)
        ax.imshow(shown)
        ax.contour(_mask(root, spec, i), levels=[0.5], colors="yellow", linewidths=0.8)
        ax.set_title(i[:16], fontsize=7)
        ax.axis("off")
    fig.suptitle(f"{kind}: foreground labels green, background red, mask outline yellow", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def write_report(rows: list, settings: dict, labels_dir: Path, kind: str) -> dict:
    cols = ["id", "mask_pixels", "pixels", "labelled", "foreground", "background", "labelled_fraction", "agreement"]
    lines = [",".join(cols)] + [",".join(str(r[c]) if not isinstance(r[c], float) else f"{r[c]:.6g}" for c in cols)
                                for r in rows]
    write_text_atomic(labels_dir / f"{kind}_report.csv", "\n".join(lines) + "\n")
    total = total_stats(rows)
    write_json(labels_dir / f"{kind}_report.json", {"settings": settings, "total": total})
    return total


def make_sparse_labels(root, kind: str, data: str = "kvasir", seed: int = 0, split: str = "train",
                       overwrite: bool = False, sheet: bool = True, **options) -> dict:
    """Simulate `kind` labels for the ids of ROOT/<split>.txt ("all": every mask) and write maps and report.

    The maps are written to a temporary folder renamed onto ROOT/labels/<kind> at the end: an error leaves
    nothing half-written. Returns the report's totals.
    """
    root, spec = Path(root), load_spec(data)
    if kind not in SIMULATORS:
        raise DataError(f"--kind {kind!r}: expected one of {', '.join(KINDS)}")
    if not (root / "masks").is_dir():
        raise DataError(f"no masks folder in {root} (simulated labels are made from ROOT/masks)")
    ids = sorted(p.name[:-len(spec.mask_ext)] for p in (root / "masks").glob(f"*{spec.mask_ext}")) \
        if split == "all" else read_ids(root / f"{split}.txt")
    if not ids:
        raise DataError(f"no {spec.mask_ext} masks in {root / 'masks'}")
    labels_dir = root / "labels"
    final = labels_dir / kind
    if final.exists() and not overwrite:
        raise DataError(f"{final} exists; pass --overwrite to replace it")
    labels_dir.mkdir(exist_ok=True)
    tmp = labels_dir / f".{kind}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        rows = []
        for i in ids:
            mask = _mask(root, spec, i)
            labels = SIMULATORS[kind](mask, image_rng(seed, i), **options)
            Image.fromarray(labels).save(tmp / f"{i}.png")
            rows.append({"id": i, "mask_pixels": int(mask.sum()), **label_stats(labels, mask)})
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    total = write_report(rows, {"kind": kind, "seed": seed, "split": split, "data": spec.name, **options},
                         labels_dir, kind)
    if sheet:
        example_sheet(root, spec, kind, ids, final, labels_dir / f"{kind}_report.png")
    return total


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", required=True, help="prepared dataset root (masks/, <split>.txt)")
    p.add_argument("--kind", required=True, choices=KINDS, help="which annotation to simulate")
    p.add_argument("--seed", type=int, default=0, help="seed (each image's generator is seeded from it and its id)")
    p.add_argument("--data", default="kvasir", help="dataset spec (name or file): the masks' file extension")
    p.add_argument("--split", default="train", help="ids of ROOT/<split>.txt, or 'all' for every mask")
    p.add_argument("--count", type=int, default=1, help="points: K points per component (foreground and background)")
    p.add_argument("--radius", type=int, default=5, help="points: disk radius in px")
    p.add_argument("--margin", type=int, default=10, help="points: foreground points this far inside the edge")
    p.add_argument("--erosion", default="4,10", help="scribbles: erosion iterations range LO,HI (WSL4MIS: 4,10)")
    p.add_argument("--width", type=int, default=1, help="scribbles: dilations of the skeleton line (3 px wide)")
    p.add_argument("--gap", type=int, default=10, help="background labels outside the mask dilated by GAP px")
    p.add_argument("--overwrite", action="store_true", help="replace an existing ROOT/labels/<kind>/")
    p.add_argument("--no-sheet", action="store_true", help="no example picture")


def options_of(a) -> dict:
    if a.kind == "points":
        if a.count < 1 or a.radius < 0 or a.margin < 0 or a.gap < 0:
            raise DataError("--count must be >= 1 and --radius, --margin, --gap >= 0")
        return {"count": a.count, "radius": a.radius, "margin": a.margin, "gap": a.gap}
    try:
        lo, hi = (int(v) for v in a.erosion.split(","))
    except ValueError:
        raise DataError(f"--erosion {a.erosion!r}: expected LO,HI integers, e.g. 4,10") from None
    if not 0 <= lo <= hi or a.width < 0 or a.gap < 0:
        raise DataError(f"--erosion {a.erosion}: expected 0 <= LO <= HI; --width and --gap >= 0")
    return {"erosion": (lo, hi), "width": a.width, "gap": a.gap}


def run(a) -> int:
    total = make_sparse_labels(a.root, a.kind, a.data, a.seed, a.split, a.overwrite, not a.no_sheet, **options_of(a))
    print(f"sparse {a.kind}: {total['images']} map(s) -> {Path(a.root) / 'labels' / a.kind}; labelled "
          f"{100 * total['labelled_fraction']:.3f} % of the pixels ({total['foreground']} foreground, "
          f"{total['background']} background), agreement with the masks {total['agreement']:.4f}; report "
          f"{Path(a.root) / 'labels' / (a.kind + '_report.csv')}")
    return 0


def main(argv=None) -> int:
    """`python -m prepare sparse ARGS` (prepare/cli.py) with ARGS = argv."""
    from prepare.cli import main as prepare_main
    return prepare_main(["sparse", *(argv if argv is not None else sys.argv[1:])])
