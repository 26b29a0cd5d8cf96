"""The whole gaze command: fixation CSV -> heatmaps -> CRF maps -> Dice report and PNG sheet.

Layout (as the paper's notebooks):
    kvasir    ROOT/images/<id>.jpg, ROOT/masks/<id>.jpg; maps saved as .jpg (Pillow default quality); sigma 70
    prostate  ROOT/images/<id>.dcm, ROOT/masks/<id>.png; maps saved as .png; sigma 50
    OUT (default ROOT/gaze)/heatmap/<id>.<ext>, OUT/crf_compat1/<id>.<ext>, OUT/report.json, OUT/report.png
The CRF reads the heatmap back from its file (/255). Stored values follow the notebooks exactly: a heatmap
is float16 (`draw_heatmap` returns float16), saved as `(heatmap.astype(np.float16) * 255).astype(np.uint8)`;
a CRF map is the float32 marginal, saved as `(crf_map * 255).astype(np.uint8)` with no float16 step.

Work runs in phases (heatmap, crf, report), each parallel over images in a spawn process pool whose
workers use one thread each. The torch CRF backend instead runs in this process, batching images
(GPU), while threads read and write files. Existing maps are skipped unless overwrite=True; files are
written atomically, so an interrupted run never leaves a half-written map to be skipped later.
"""
import contextlib
import multiprocessing as mp
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from datasets.io import DataError, dicom_to_uint8_rgb, read_dicom, read_gray, read_image
from common.dataspec import DataSpec, load_spec
from common.files import write_json
from gaze import crf as crf_mod
from gaze import report as rep
from gaze.fixations import read_fixations
from gaze.heatmap import heatmap_f32, to_uint8

STEPS = ("heatmap", "crf")
CRF_DIR = "crf_compat1"


@dataclass(frozen=True)
class Job:
    """Everything a worker needs for one image (picklable)."""
    id: str
    fixations: np.ndarray  # (K, 3) x, y, duration
    height: int
    width: int
    sigma: float
    canvas: int
    crf_params: Optional[dict]  # the spec's CRF parameters (None: no CRF step)
    image: Path
    mask: Path
    heatmap: Path
    crf: Path


# ----------------------------------------------------------------------------- file helpers

def crf_to_uint8(q: np.ndarray) -> np.ndarray:
    """A CRF map's stored value, as the notebooks' `(crf_map * 255).astype(np.uint8)` on the float32 marginal.

    The clip only guards the cast (a marginal lies in [0, 1], so it changes nothing there).
    """
    return np.clip(np.asarray(q, dtype=np.float32) * np.float32(255), 0, 255).astype(np.uint8)


def save_u8(path: Path, u8: np.ndarray) -> None:
    """Save a uint8 map atomically; format from the suffix (JPEG: Pillow's default quality, 75)."""
    path = Path(path)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG"}[path.suffix.lower()]
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp")
    Image.fromarray(u8).save(tmp, format=fmt)
    os.replace(tmp, path)


def save_map(path: Path, gaze_map: np.ndarray) -> None:
    """Save a heatmap ([0, 1], float16 or float32 before the cast) as the notebooks do: float16 * 255, truncated."""
    save_u8(path, to_uint8(gaze_map))


def save_crf_map(path: Path, q: np.ndarray) -> None:
    """Save a CRF marginal (float32, [0, 1]) as the notebooks do: float32 * 255, truncated."""
    save_u8(path, crf_to_uint8(q))


def load_crf_image(path: Path) -> np.ndarray:
    """The CRF colour input: RGB uint8; a DICOM slice is min-max scaled to 0-255 and replicated."""
    if Path(path).suffix.lower() == ".dcm":
        return dicom_to_uint8_rgb(read_dicom(path))
    im = read_image(path)
    return np.repeat(im[..., None], 3, axis=2) if im.ndim == 2 else im


def _check_shape(path: Path, shape: tuple, job: Job, what: str) -> None:
    if tuple(shape[:2]) != (job.height, job.width):
        raise DataError(f"{path}: {what} is {shape[0]} x {shape[1]} (H x W) but the fixation CSV says "
                        f"{job.height} x {job.width} for image {job.id}")


# ----------------------------------------------------------------------------- per-image work (run in workers)

def heatmap_task(job: Job) -> float:
    """Compute and save one heatmap; returns seconds spent."""
    t = time.perf_counter()
    # save_map's to_uint8 does the float16 step (faster than casting here)
    save_map(job.heatmap, heatmap_f32(job.fixations, job.height, job.width, job.sigma, job.canvas))
    return time.perf_counter() - t


def crf_inputs(job: Job) -> tuple:
    """(image RGB uint8, heatmap read back from its file as float32 in [0, 1]) with sizes checked."""
    prob = read_gray(job.heatmap)
    _check_shape(job.heatmap, prob.shape, job, "the heatmap")
    image = load_crf_image(job.image)
    _check_shape(job.image, image.shape, job, "the image")
    return image, prob


def crf_task(job: Job, backend: str = "pydensecrf", device: str = "cpu") -> float:
    """CRF-refine one saved heatmap and save the result; returns seconds spent."""
    t = time.perf_counter()
    image, prob = crf_inputs(job)
    save_crf_map(job.crf, crf_mod.refine(image, prob, backend, device, **job.crf_params))
    return time.perf_counter() - t


def report_task(job: Job) -> dict:
    """Dice of the saved maps against the mask: {"heatmap": (soft, binary) or None, "crf": ...}."""
    out = {"id": job.id, "heatmap": None, "crf": None}
    if not job.mask.is_file():
        return out
    mask = read_gray(job.mask)
    _check_shape(job.mask, mask.shape, job, "the mask")
    for name, path in (("heatmap", job.heatmap), ("crf", job.crf)):
        if path.is_file():
            out[name] = rep.map_dice(read_gray(path), mask)
    return out


def _init_worker() -> None:
    import cv2
    cv2.setNumThreads(1)
    if "torch" in sys.modules:  # spawn re-imports the parent's __main__, which may import torch
        sys.modules["torch"].set_num_threads(1)


@contextlib.contextmanager
def _single_thread_env():
    """Spawned workers inherit os.environ at start: make their BLAS/OpenMP single-threaded."""
    keys = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: "1" for k in keys})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _map(fn, jobs: list, pool, desc: str, quiet: bool, chunksize: int = 1) -> list:
    if not jobs:
        return []
    it = pool.imap_unordered(fn, jobs, chunksize) if pool is not None else map(fn, jobs)
    return list(tqdm(it, total=len(jobs), desc=desc, disable=quiet, unit="img"))


def _crf_torch(jobs: list, device: str, threads: int, batch: int, quiet: bool) -> None:
    """Torch backend: batches of images through crf_refine_torch_batch; file I/O in threads, one batch ahead."""
    chunks = [jobs[i:i + batch] for i in range(0, len(jobs), batch)]
    bar = tqdm(total=len(jobs), desc="crf (torch)", disable=quiet, unit="img")
    with ThreadPoolExecutor(max(1, threads)) as io:
        saves = []
        nxt = io.map(crf_inputs, chunks[0]) if chunks else None
        for k, chunk in enumerate(chunks):
            inputs = list(nxt)
            if k + 1 < len(chunks):
                nxt = io.map(crf_inputs, chunks[k + 1])
            images, probs = [a for a, _ in inputs], [b for _, b in inputs]
            maps = crf_mod.refine_batch(images, probs, "torch", device, **chunk[0].crf_params)
            saves += [io.submit(save_crf_map, j.crf, m) for j, m in zip(chunk, maps)]
            bar.update(len(chunk))
        for s in saves:
            s.result()
    bar.close()


# ----------------------------------------------------------------------------- the command

def make_jobs(csv_path, root, data, out_dir, ids: Optional[Sequence[str]] = None) -> list:
    """One Job per image id of the CSV (or of `ids`, which must all be in the CSV), sorted by id."""
    spec = load_spec(data)
    root, out_dir = Path(root), Path(out_dir)
    fix = read_fixations(csv_path)
    if ids is not None:
        unknown = [i for i in ids if i not in fix]
        if unknown:
            raise DataError(f"{len(unknown)} requested id(s) have no fixations in {csv_path}: {unknown[:5]}")
        fix = {i: fix[i] for i in ids}
    ext = spec.gaze_ext
    return [Job(id=i, fixations=f.fixations, height=f.height, width=f.width, sigma=spec.heatmap_sigma,
                canvas=spec.heatmap_canvas, crf_params=spec.crf,
                image=root / "images" / f"{i}{spec.image_ext}", mask=root / "masks" / f"{i}{spec.mask_ext}",
                heatmap=out_dir / "heatmap" / f"{i}{ext}", crf=out_dir / CRF_DIR / f"{i}{ext}")
            for i, f in sorted(fix.items())]


def make_gaze_maps(csv_path, root, data: str, out_dir=None, steps: Sequence[str] = STEPS,
                   crf_backend: str = "pydensecrf", device: str = "cpu", workers: int = 0,
                   overwrite: bool = False, report: bool = True, sheet: bool = True, quiet: bool = False,
                   ids: Optional[Sequence[str]] = None, crf_batch: int = 16) -> dict:
    """Write heatmaps and/or CRF maps for every image of a fixation CSV, then report their quality.

    Args:
        csv_path: GazeMedSeg fixation CSV.
        root: dataset root (images/, masks/); only read.
        data: "kvasir" or "prostate" (file layout, sigma, map format).
        out_dir: where maps go (default ROOT/gaze).
        steps: subset of ("heatmap", "crf"); "crf" alone needs the heatmaps on disk.
        crf_backend: "pydensecrf" (CPU, process pool) or "torch" (batched in this process on `device`).
        device: "cpu" or "cuda" (torch backend only).
        workers: processes for the pool (0 = os.cpu_count(); 1 = run in this process); also the I/O
            threads of the torch backend.
        overwrite: recompute maps that already exist.
        report, sheet: compute Dice (writes OUT/report.json) / draw OUT/report.png.
        quiet: no progress bars and no printed report.
        ids: only these image ids (all must be in the CSV).
        crf_batch: images per torch CRF batch.
    Returns:
        dict with counts (written/skipped per step, missing images/masks), mean Dice per map type
        ("dice": {name: {"n", "soft_gt", "binary_gt"}}), per-image (soft, binary) Dice ("per_image"),
        wall times per phase ("time_s") and paths. Also written to OUT/report.json.
    """
    t0 = time.perf_counter()
    spec: DataSpec = load_spec(data)
    steps = tuple(steps)
    bad = [s for s in steps if s not in STEPS]
    if bad or not steps:
        raise ValueError(f"steps must be a non-empty subset of {STEPS}; got {steps}")
    if crf_backend not in crf_mod.BACKENDS:
        raise ValueError(f"unknown CRF backend {crf_backend!r}; choose one of {crf_mod.BACKENDS}")
    if crf_backend == "pydensecrf" and device != "cpu" and "crf" in steps:
        raise ValueError(f"the pydensecrf backend runs on the CPU only; got device {device!r} "
                         "(use --crf-backend torch)")
    workers = (os.cpu_count() or 1) if workers == 0 else int(workers)
    if workers < 1:
        raise ValueError(f"workers must be >= 0; got {workers}")
    root = Path(root)
    out_dir = Path(out_dir) if out_dir is not None else root / "gaze"

    jobs = make_jobs(csv_path, root, data, out_dir, ids)
    for sub in ("heatmap", CRF_DIR) if "crf" in steps else ("heatmap",):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    result = {"data": spec.name, "csv": str(csv_path), "root": str(root), "out_dir": str(out_dir), "n_ids": len(jobs),
              "steps": list(steps), "crf_backend": crf_backend, "device": device, "workers": workers,
              "written": {}, "skipped": {}, "missing_images": [], "missing_masks": [],
              "images_without_fixations": [], "time_s": {}}
    known = {j.id for j in jobs}
    if (root / "images").is_dir() and ids is None:
        result["images_without_fixations"] = sorted(
            p.stem for p in (root / "images").glob(f"*{spec.image_ext}") if p.stem not in known)

    todo_h = [j for j in jobs if overwrite or not j.heatmap.is_file()] if "heatmap" in steps else []
    todo_c = []
    if "crf" in steps:
        if "heatmap" not in steps:
            absent = [j for j in jobs if not j.heatmap.is_file()]
            if absent:
                raise DataError(f"{len(absent)} heatmap(s) missing, e.g. {absent[0].heatmap}; "
                                "run the heatmap step first")
        result["missing_images"] = [j.id for j in jobs if not j.image.is_file()]
        missing = set(result["missing_images"])
        todo_c = [j for j in jobs if j.id not in missing and (overwrite or not j.crf.is_file())]
    do_report = report and any(j.mask.is_file() for j in jobs)
    pool_jobs = len(todo_h) + (len(todo_c) if crf_backend == "pydensecrf" else 0) + (len(jobs) if do_report else 0)

    pool = None
    try:
        if workers > 1 and pool_jobs > 1:
            t = time.perf_counter()
            with _single_thread_env():
                pool = mp.get_context("spawn").Pool(workers, initializer=_init_worker)
            result["time_s"]["pool_start"] = time.perf_counter() - t
        if "heatmap" in steps:
            t = time.perf_counter()
            _map(heatmap_task, todo_h, pool, "heatmap", quiet, chunksize=8)
            result["written"]["heatmap"], result["skipped"]["heatmap"] = len(todo_h), len(jobs) - len(todo_h)
            result["time_s"]["heatmap"] = time.perf_counter() - t
        if "crf" in steps:
            t = time.perf_counter()
            if crf_backend == "torch":
                _crf_torch(todo_c, device, workers, crf_batch, quiet)
            else:
                _map(partial(crf_task, backend="pydensecrf", device="cpu"), todo_c, pool, "crf", quiet)
            result["written"]["crf"] = len(todo_c)
            result["skipped"]["crf"] = len(jobs) - len(result["missing_images"]) - len(todo_c)
            result["time_s"]["crf"] = time.perf_counter() - t
        if report:
            t = time.perf_counter()
            per = _map(report_task, jobs, pool, "report", quiet, chunksize=8) if do_report else []
            result["missing_masks"] = sorted(j.id for j in jobs if not j.mask.is_file())
            per_image = {"heatmap": [r["heatmap"] for r in per if r["heatmap"] is not None]}
            if "crf" in steps or any(r["crf"] is not None for r in per):
                per_image["crf"] = [r["crf"] for r in per if r["crf"] is not None]
            result["dice"] = rep.summarise(per_image)
            result["per_image"] = {r["id"]: {k: r[k] for k in per_image if r[k] is not None}
                                   for r in sorted(per, key=lambda r: r["id"]) if r["heatmap"] or r["crf"]}
            result["time_s"]["report"] = time.perf_counter() - t
    except BaseException:  # an error or Ctrl-C: stop the workers now rather than finish the queue
        if pool is not None:
            pool.terminate()
            pool = None
        raise
    finally:
        if pool is not None:
            pool.close()
            pool.join()

    if sheet:
        t = time.perf_counter()
        rows = _sheet_rows(jobs)
        if rows:
            rep.save_sheet(rep.make_sheet(rows), out_dir / "report.png")
            result["sheet"] = str(out_dir / "report.png")
        result["time_s"]["sheet"] = time.perf_counter() - t
    result["time_s"]["total"] = time.perf_counter() - t0
    if report:
        write_json(out_dir / "report.json", result)
    if not quiet:
        print(rep.format_report(result))
    return result


def _sheet_rows(jobs: list, n: int = 4) -> list:
    """Rows for up to n images spread over the id list, preferring images that have every panel."""
    have = [j for j in jobs if j.heatmap.is_file()]
    full = [j for j in have if j.image.is_file() and j.mask.is_file() and j.crf.is_file()]
    pick = full if full else have
    if pick:
        pick = [pick[k] for k in np.unique(np.linspace(0, len(pick) - 1, min(n, len(pick))).round().astype(int))]
    rows = []
    for j in pick:
        image = load_crf_image(j.image) if j.image.is_file() else None
        crf = read_gray(j.crf) if j.crf.is_file() else None
        mask = read_gray(j.mask) if j.mask.is_file() else None
        rows.append(rep.sheet_row(image, j.fixations[:, 0], j.fixations[:, 1], read_gray(j.heatmap), crf, mask, j.id))
    return rows
