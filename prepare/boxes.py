"""Box supervision: Kvasir-SEG's bounding boxes as pseudo-masks, optionally refined by the gaze pipeline's CRF.

The boxes file ships with Kvasir-SEG (`kavsir_bboxes.json`):

    {"<id>": {"height": H, "width": W, "bbox": [{"label": "polyp", "xmin": .., "ymin": .., "xmax": .., "ymax": ..}]}}

A box covers columns xmin..xmax-1 and rows ymin..ymax-1 (xmax / ymax are exclusive: the file has boxes with
xmax == width and none with xmax > width). Maps are written where training reads gaze maps:

    ROOT/gaze/box/<id><gaze_ext>       255 inside any box of the image, 0 outside
    ROOT/gaze/box_crf/<id><gaze_ext>   the same dense CRF as the gaze maps (the spec's parameters, pydensecrf)
                                       on a box prior: P(fg) = BOX_PRIOR (0.7) inside a box, 0 outside

Why BOX_PRIOR = 0.7 and not 1: the CRF's unary is -log P (clipped at 1e-5) and its bilateral term is
normalised, so it moves a pixel's energy by at most `compat` (1). A pixel can change label only if
|log(P / (1 - P))| < compat, i.e. P < e / (1 + e) = 0.731: with a prior of 1 (or 0.9, or pi/4) the CRF
returns the box unchanged. 0.7 is the most confident round prior the CRF can still overrule, so the
box+CRF map is the box with its corners carved off along colour edges. Outside a box the prior is 0
(clipped to 1e-5): boxes are tight, nothing outside them is polyp, and the map never grows past a box.
Train on either with `--gaze_dir box --num_levels 1` (threshold 0.5).
"""
import json
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np

from common.dataspec import DataSpec
from datasets.io import DataError, image_size, read_gray
from prepare.util import fail_listing

BOX_DIR, BOX_CRF_DIR = "box", "box_crf"
BOX_PRIOR = 0.7  # < e / (1 + e): see the module docstring
Box = Tuple[int, int, int, int]  # xmin, ymin, xmax (exclusive), ymax (exclusive)


def _int(entry: dict, key: str, where: str) -> int:
    v = entry.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v):
        raise DataError(f"{where}: '{key}' is {v!r}, expected an integer")
    return int(v)


def read_boxes(path) -> Dict[str, Tuple[int, int, List[Box]]]:
    """{id: (height, width, [boxes])} of a Kvasir-SEG boxes file, every entry checked.

    Args:
        path: the JSON file ({id: {height, width, bbox: [{label, xmin, ymin, xmax, ymax}, ...]}}).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"boxes file not found: {path}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read boxes file {path}: {e}") from e
    if not isinstance(raw, dict) or not raw:
        raise DataError(f"boxes file {path}: expected a non-empty JSON object {{id: {{height, width, bbox}}}}")
    out = {}
    for i, entry in raw.items():
        where = f"{path}: id '{i}'"
        if not isinstance(entry, dict) or not isinstance(entry.get("bbox"), list) or not entry["bbox"]:
            raise DataError(f"{where}: expected {{height, width, bbox: [{{xmin, ymin, xmax, ymax}}, ...]}} "
                            f"with at least one box")
        h, w = _int(entry, "height", where), _int(entry, "width", where)
        boxes = []
        for n, b in enumerate(entry["bbox"]):
            at = f"{where} box {n}"
            if not isinstance(b, dict):
                raise DataError(f"{at}: expected {{xmin, ymin, xmax, ymax}}, got {b!r}")
            x0, y0, x1, y1 = (_int(b, k, at) for k in ("xmin", "ymin", "xmax", "ymax"))
            if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
                raise DataError(f"{at}: box x {x0}..{x1}, y {y0}..{y1} is empty or outside the "
                                f"{h}x{w} (HxW) image (expected 0 <= xmin < xmax <= width, 0 <= ymin < ymax <= height)")
            boxes.append((x0, y0, x1, y1))
        out[i] = (h, w, boxes)
    return out


def box_mask(height: int, width: int, boxes: Sequence[Box]) -> np.ndarray:
    """uint8 (H, W): 255 inside any box (xmax, ymax exclusive), 0 elsewhere."""
    mask = np.zeros((height, width), np.uint8)
    for x0, y0, x1, y1 in boxes:
        mask[y0:y1, x0:x1] = 255
    return mask


def box_prior(mask: np.ndarray, inside: float = BOX_PRIOR) -> np.ndarray:
    """The CRF's foreground probability: `inside` where mask > 0, 0 elsewhere, float32."""
    return np.where(mask > 0, np.float32(inside), np.float32(0.0))


def check_boxes(boxes: dict, image_paths: Dict[str, Path], boxes_file) -> None:
    """Every image has boxes and the recorded size equals the image's; every boxed id has an image."""
    problems = [f"no boxes for image {p}" for i, p in sorted(image_paths.items()) if i not in boxes]
    problems += [f"id '{i}' has boxes but no image" for i in sorted(boxes.keys() - image_paths.keys())]
    for i in sorted(boxes.keys() & image_paths.keys()):
        h, w, _ = boxes[i]
        size = image_size(image_paths[i])
        if size != (h, w):
            problems.append(f"id '{i}': {boxes_file} says {h}x{w} (HxW) but {image_paths[i]} is {size[0]}x{size[1]}")
    fail_listing(problems, f"problem(s) between {boxes_file} and the images")


def check_box_file(boxes_file, images: Path, spec: DataSpec, crf: bool = False) -> tuple:
    """({id: image path}, boxes) after every check of the boxes file against the images of the folder `images`
    (run on the source folder before anything is written, and again on the prepared root)."""
    image_paths = {p.stem: p for p in sorted(Path(images).glob(f"*{spec.image_ext}"))}
    if not image_paths:
        raise DataError(f"no {spec.image_ext} images in {images}")
    boxes = read_boxes(boxes_file)
    check_boxes(boxes, image_paths, boxes_file)
    if crf and spec.crf is None:
        raise DataError(f"--box-crf: the dataset spec {spec.source} has no CRF parameters (crf: null)")
    return image_paths, boxes


def _box_crf_task(args: tuple) -> None:
    """Worker: CRF-refine one box prior and save it (pydensecrf, one thread)."""
    from gaze import crf as crf_mod
    from gaze.pipeline import load_crf_image, save_map

    image_path, mask, out, crf_params, prior = args
    image = load_crf_image(image_path)
    save_map(out, crf_mod.refine(image, box_prior(mask, prior), "pydensecrf", "cpu", **crf_params))


def make_box_maps(root, boxes_file, spec: DataSpec, crf: bool = False, workers: int = 1,
                  prior: float = BOX_PRIOR) -> dict:
    """Write ROOT/gaze/box/<id> (and ROOT/gaze/box_crf/<id> with CRF) for every image of ROOT/images.

    Args:
        root: a prepared root (images/ written).
        boxes_file: the Kvasir-SEG boxes JSON.
        spec: the dataset spec (gaze-map extension, CRF parameters).
        crf: also write the CRF-refined maps.
        workers: processes for the CRF.
        prior: the CRF's foreground probability inside a box (0.5 < prior <= 1).
    Returns:
        {"ids": n, "box": n written, "box_crf": n written}.
    """
    from gaze.pipeline import save_map  # torch-free; imported here so `datasets.io` users do not pay for it

    root = Path(root)
    image_paths, boxes = check_box_file(boxes_file, root / "images", spec, crf)
    box_dir, crf_dir = root / "gaze" / BOX_DIR, root / "gaze" / BOX_CRF_DIR
    box_dir.mkdir(parents=True, exist_ok=True)
    jobs = []
    for i, path in image_paths.items():
        mask = box_mask(*boxes[i])
        save_map(box_dir / f"{i}{spec.gaze_ext}", mask.astype(np.float32) / 255.0)
        jobs.append((path, mask, crf_dir / f"{i}{spec.gaze_ext}", dict(spec.crf or {}), prior))
    if crf:
        crf_dir.mkdir(parents=True, exist_ok=True)
        if workers > 1:
            with ProcessPoolExecutor(workers) as pool:  # pydensecrf is single-threaded: one image per process
                list(pool.map(_box_crf_task, jobs, chunksize=4))
        else:
            for job in jobs:
                _box_crf_task(job)
    return {"ids": len(image_paths), "box": len(jobs), "box_crf": len(jobs) if crf else 0}


def map_dice_report(root, spec: DataSpec, dirs: Sequence[str] = (BOX_DIR, BOX_CRF_DIR)) -> dict:
    """{dir: (mean soft-GT Dice, mean binary-GT Dice, n)} of (map > 0.5) vs ROOT/masks, as the gaze report.

    Maps without a mask are left out; a folder with no maps is left out of the result.
    """
    from gaze.report import map_dice

    root, out = Path(root), {}
    for d in dirs:
        values = []
        for p in sorted((root / "gaze" / d).glob(f"*{spec.gaze_ext}")):
            mask = root / "masks" / f"{p.stem}{spec.mask_ext}"
            if mask.is_file():
                values.append(map_dice(read_gray(p), read_gray(mask)))
        if values:
            a = np.asarray(values, np.float64)
            out[d] = (float(a[:, 0].mean()), float(a[:, 1].mean()), len(a))
    return out
