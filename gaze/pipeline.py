"""The whole gaze command: fixation CSV -> heatmaps -> CRF maps -> Dice report and PNG sheet.

Layout (from the dataset spec; kvasir: .jpg images, masks and maps, sigma 70; prostate: .dcm images, .png
masks and maps, sigma 50):
    ROOT/images/<id><image_ext>, ROOT/masks/<id><mask_ext> (masks only for the Dice report)
    OUT (default ROOT/gaze)/heatmap/<id><gaze_ext>, OUT/crf_compat1/<id><gaze_ext> (not with `crf: null`),
    OUT/manifest.json, OUT/report.json, OUT/report.png
The CRF reads the heatmap back from its file (/255). Stored values follow the notebooks exactly: a heatmap
is float16 (`draw_heatmap` returns float16), saved as `(heatmap.astype(np.float16) * 255).astype(np.uint8)`;
a CRF map is the float32 marginal, saved as `(crf_map * 255).astype(np.uint8)` with no float16 step.

Work runs in phases (heatmap, crf, report), each parallel over images in a spawn process pool whose
workers use one thread each. The torch CRF backend instead runs in this process, batching images
(GPU), while threads read and write files. OUT/manifest.json records what each map was made from
(gaze.manifest): a re-run recomputes the maps that are missing or whose inputs changed, and skips the
rest unless overwrite=True. Files are written atomically and a map's entry is dropped before it is
rewritten, so an interrupted run never leaves a map that a later run would wrongly skip.
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

from common.dataspec import DataSpec, load_spec
from common.errors import UserError
from common.files import atomic_path, write_json
from datasets.io import DataError, dicom_to_uint8_rgb, image_size, read_dicom, read_gray, read_image
from gaze import crf as crf_mod
from gaze import manifest as manifest_mod
from gaze import report as rep
from gaze.fixations import ColumnMap, read_fixations
from gaze.heatmap import heatmap_f32, to_uint8
from gaze.manifest import Manifest

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
    dropped: int = 0  # fixations outside the image, dropped (--outside drop)


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
    try:
        with atomic_path(path) as tmp:
            Image.fromarray(u8).save(tmp, format=fmt)
    except OSError as e:
        raise DataError(f"{path}: cannot write the map: {e.strerror or e}") from None


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

def heatmap_task(job: Job) -> str:
    """Compute and save one heatmap; returns the image id."""
    # save_map's to_uint8 does the float16 step (faster than casting here)
    save_map(job.heatmap, heatmap_f32(job.fixations, job.height, job.width, job.sigma, job.canvas))
    return job.id


def crf_inputs(job: Job) -> tuple:
    """(image RGB uint8, heatmap read back from its file as float32 in [0, 1]) with sizes checked."""
    prob = read_gray(job.heatmap)
    _check_shape(job.heatmap, prob.shape, job, "the heatmap")
    image = load_crf_image(job.image)
    _check_shape(job.image, image.shape, job, "the image")
    return image, prob


def crf_task(job: Job, backend: str = "pydensecrf", device: str = "cpu") -> str:
    """CRF-refine one saved heatmap and save the result; returns the image id."""
    image, prob = crf_inputs(job)
    save_crf_map(job.crf, crf_mod.refine(image, prob, backend, device, **job.crf_params))
    return job.id


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


def _map(fn, jobs: list, pool, desc: str, quiet: bool, chunksize: int = 1, done: Optional[list] = None) -> list:
    """fn over jobs (in the pool, or here); results also go to `done` as they come, for a caller interrupted midway."""
    done = [] if done is None else done
    if not jobs:
        return done
    it = pool.imap_unordered(fn, jobs, chunksize) if pool is not None else map(fn, jobs)
    for r in tqdm(it, total=len(jobs), desc=desc, disable=quiet, unit="img"):
        done.append(r)
    return done


class LazyPool:
    """A spawn process pool started on first use by a phase with more than one task (workers > 1)."""

    def __init__(self, workers: int, timings: dict):
        self.workers, self.timings, self.pool = workers, timings, None

    def get(self, n_tasks: int):
        if self.pool is None and self.workers > 1 and n_tasks > 1:
            t = time.perf_counter()
            with _single_thread_env():
                self.pool = mp.get_context("spawn").Pool(self.workers, initializer=_init_worker)
            self.timings["pool_start"] = time.perf_counter() - t
        return self.pool

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if self.pool is None:
            return
        if exc_type is not None:  # an error or Ctrl-C: stop the workers now rather than finish the queue
            self.pool.terminate()
        else:
            self.pool.close()
        self.pool.join()


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


# ----------------------------------------------------------------------------- the command, step by step

def check_options(spec: DataSpec, steps: Optional[Sequence[str]], crf_backend: str, device: str, workers: int,
                  root, out_dir) -> tuple:
    """Validate the options before anything is read or written; returns (steps, workers, root, out_dir).

    steps None means every step the spec has: heatmap and crf, or heatmap alone when the spec says `crf: null`.
    """
    steps = (STEPS if spec.crf is not None else ("heatmap",)) if steps is None else tuple(steps)
    bad = [s for s in steps if s not in STEPS]
    if bad or not steps:
        raise UserError(f"--steps must be a non-empty subset of {','.join(STEPS)}; got {','.join(steps)!r}")
    if "crf" in steps and spec.crf is None:
        raise UserError(f"{spec.source}: crf is null, so the gaze maps are the heatmaps (train with --gaze_dir "
                        "heatmap); drop crf from --steps")
    if crf_backend not in crf_mod.BACKENDS:
        raise UserError(f"unknown CRF backend {crf_backend!r}; choose one of {crf_mod.BACKENDS}")
    if crf_backend == "pydensecrf" and device != "cpu" and "crf" in steps:
        raise UserError(f"the pydensecrf backend runs on the CPU only; got device {device!r} "
                        "(use --crf-backend torch)")
    workers = (os.cpu_count() or 1) if workers == 0 else int(workers)
    if workers < 1:
        raise UserError(f"--workers must be >= 0; got {workers}")
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"--root {root}: {'not a directory' if root.exists() else 'no such directory'}")
    out_dir = Path(out_dir) if out_dir is not None else root / "gaze"
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"--out {out_dir}: exists and is not a directory")
    if crf_backend == "pydensecrf" and "crf" in steps:
        try:
            import pydensecrf.densecrf  # noqa: F401  (checked here, not after the heatmaps are done)
        except ImportError:
            raise UserError("the crf step with the pydensecrf backend needs `pip install pydensecrf2==1.1` "
                            "(or --crf-backend torch, or --steps heatmap)") from None
    return steps, workers, root, out_dir


def _size_from_image(root: Path, spec: DataSpec):
    """id -> (H, W) read from ROOT/images/<id><ext> (for fixation CSVs without size columns)."""
    def size(iid: str) -> tuple:
        path = root / "images" / f"{iid}{spec.image_ext}"
        if not path.is_file():
            raise DataError(f"{path}: not found (the fixation CSV has no width/height columns, so the image "
                            "size is read from the image)")
        return image_size(path)
    return size


def make_jobs(csv_path, root, data, out_dir, ids: Optional[Sequence[str]] = None,
              columns: Optional[ColumnMap] = None, coords: str = "normalized", outside: str = "error",
              counts: Optional[dict] = None) -> list:
    """One Job per image id of the CSV (or of `ids`, which must all be in the CSV), sorted by id.
    `counts["dropped"]`: the fixations dropped (outside="drop"), images left without any included."""
    spec = load_spec(data)
    root, out_dir = Path(root), Path(out_dir)
    fix = read_fixations(csv_path, columns, coords, _size_from_image(root, spec), outside)
    if counts is not None:
        counts["dropped"] = fix.dropped
    if ids is not None:
        unknown = [i for i in ids if i not in fix]
        if unknown:
            raise DataError(f"{len(unknown)} requested id(s) have no fixations in {csv_path}: {unknown[:5]}")
        fix = {i: fix[i] for i in ids}
    ext = spec.gaze_ext
    return [Job(id=i, fixations=f.fixations, height=f.height, width=f.width, sigma=spec.heatmap_sigma,
                canvas=spec.heatmap_canvas, crf_params=spec.crf,
                image=root / "images" / f"{i}{spec.image_ext}", mask=root / "masks" / f"{i}{spec.mask_ext}",
                heatmap=out_dir / "heatmap" / f"{i}{ext}", crf=out_dir / CRF_DIR / f"{i}{ext}", dropped=f.dropped)
            for i, f in sorted(fix.items())]


def check_heatmaps_exist(jobs: list) -> None:
    """The crf step reads the heatmaps: all must be on disk."""
    absent = [j for j in jobs if not j.heatmap.is_file()]
    if absent:
        raise DataError(f"{len(absent)} heatmap(s) missing, e.g. {absent[0].heatmap}; run the heatmap step first")


def check_images_found(jobs: list, csv_path, root: Path, spec: DataSpec, share: float = 0.5) -> None:
    """At least `share` of the CSV's images exist under ROOT/images: a fixation file of another dataset would
    otherwise give heatmaps of images that do not exist, without a word. A root without any image (the heatmap
    step needs none when the CSV has the sizes) is checked against ROOT/masks instead, and one with neither
    is not checked."""
    where, exists = root / "images", [j.image.is_file() for j in jobs]
    if not any(root.glob(f"images/*{spec.image_ext}")):
        where, exists = root / "masks", [j.mask.is_file() for j in jobs]
        if not any(root.glob(f"masks/*{spec.mask_ext}")):
            return
    found = sum(exists)
    if found < share * len(jobs):
        ext = spec.image_ext if where.name == "images" else spec.mask_ext
        raise DataError(f"{csv_path}: {found} of {len(jobs)} images found under {where} (as <id>{ext}, the "
                        "dataset spec's extension); is it the fixation file of this dataset and root?")


def prepare_out(out_dir: Path, steps: Sequence[str]) -> None:
    """Create OUT/heatmap (and OUT/crf_compat1); a failure is a one-line error naming the folder."""
    for sub in ("heatmap", CRF_DIR) if "crf" in steps else ("heatmap",):
        try:
            (out_dir / sub).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DataError(f"--out {out_dir}: cannot create {sub}/: {e.strerror or e}") from None


def plan(jobs: list, step: str, keys: dict, manifest: Manifest, overwrite: bool, result: dict) -> list:
    """The jobs whose `step` map must be (re)computed: missing, or recorded with other inputs (or all: overwrite).

    Counts go to result: written (new + changed), changed (an existing map whose inputs differ), skipped
    (up to date).
    """
    todo, changed = [], 0
    for j in jobs:
        path = j.heatmap if step == "heatmap" else j.crf
        if not path.is_file():
            todo.append(j)
        elif overwrite or manifest.get(step, j.id) != keys[j.id]:
            todo.append(j)
            changed += 1
    result["written"][step], result["changed"][step] = len(todo), changed
    result["skipped"][step] = len(keys) - len(todo)
    manifest.forget(step, [j.id for j in todo])
    return todo


def run_heatmaps(jobs: list, manifest: Manifest, pool: LazyPool, overwrite: bool, quiet: bool, result: dict) -> None:
    """The heatmap step: compute stale or missing heatmaps, record their keys."""
    t = time.perf_counter()
    keys = {j.id: manifest_mod.heatmap_key(j.fixations, j.height, j.width, j.sigma, j.canvas, j.heatmap.suffix)
            for j in jobs}
    todo = plan(jobs, "heatmap", keys, manifest, overwrite, result)
    done: list = []
    try:
        _map(heatmap_task, todo, pool.get(len(todo)), "heatmap", quiet, chunksize=8, done=done)
    finally:  # also after an interruption: the maps that were written are up to date
        manifest.record("heatmap", {i: keys[i] for i in done})
    result["time_s"]["heatmap"] = time.perf_counter() - t


def run_crf(jobs: list, manifest: Manifest, pool: LazyPool, backend: str, device: str, batch: int,
            overwrite: bool, quiet: bool, result: dict) -> None:
    """The crf step: refine stale or missing CRF maps (heatmaps must be on disk), record their keys."""
    t = time.perf_counter()
    check_heatmaps_exist(jobs)
    result["missing_images"] = [j.id for j in jobs if not j.image.is_file()]
    have = [j for j in jobs if j.image.is_file()]
    keys = {j.id: manifest_mod.crf_key(j.heatmap, j.image, j.crf_params, backend) for j in have}
    todo = plan(have, "crf", keys, manifest, overwrite, result)
    if backend == "torch":
        _crf_torch(todo, device, pool.workers, batch, quiet)
        manifest.record("crf", {j.id: keys[j.id] for j in todo})
    else:
        done: list = []
        try:
            _map(partial(crf_task, backend="pydensecrf", device="cpu"), todo, pool.get(len(todo)), "crf", quiet,
                 done=done)
        finally:
            manifest.record("crf", {i: keys[i] for i in done})
    result["time_s"]["crf"] = time.perf_counter() - t


def run_report(jobs: list, steps: Sequence[str], pool: LazyPool, quiet: bool, result: dict) -> None:
    """Dice of the saved maps against the masks; without any mask the report says so and is skipped."""
    t = time.perf_counter()
    result["missing_masks"] = sorted(j.id for j in jobs if not j.mask.is_file())
    if len(result["missing_masks"]) == len(jobs):
        result["dice"], result["per_image"] = {}, {}
        result["report_skipped"] = "no masks in ROOT/masks: the Dice report needs them (training from gaze does not)"
        return
    per = _map(report_task, jobs, pool.get(len(jobs)), "report", quiet, chunksize=8)
    per_image = {"heatmap": [r["heatmap"] for r in per if r["heatmap"] is not None]}
    if "crf" in steps or any(r["crf"] is not None for r in per):
        per_image["crf"] = [r["crf"] for r in per if r["crf"] is not None]
    result["dice"] = rep.summarise(per_image)
    result["per_image"] = {r["id"]: {k: r[k] for k in per_image if r[k] is not None}
                           for r in sorted(per, key=lambda r: r["id"]) if r["heatmap"] or r["crf"]}
    result["time_s"]["report"] = time.perf_counter() - t


def make_gaze_maps(csv_path, root, data, out_dir=None, steps: Optional[Sequence[str]] = None,
                   crf_backend: str = "pydensecrf", device: str = "cpu", workers: int = 0,
                   overwrite: bool = False, report: bool = True, sheet: bool = True, quiet: bool = False,
                   ids: Optional[Sequence[str]] = None, crf_batch: int = 16, columns: Optional[ColumnMap] = None,
                   coords: str = "normalized", outside: str = "error") -> dict:
    """Write heatmaps and/or CRF maps for every image of a fixation CSV, then report their quality.

    Args:
        csv_path: fixation CSV (GazeMedSeg columns, or any CSV with `columns`).
        root: dataset root (images/, masks/); only read.
        data: a built-in dataset name or a spec path / DataSpec (file layout, sigma, CRF, map format).
        out_dir: where maps go (default ROOT/gaze).
        steps: subset of ("heatmap", "crf"); default both (heatmap alone when the spec has `crf: null`);
            "crf" alone needs the heatmaps on disk.
        crf_backend: "pydensecrf" (CPU, process pool) or "torch" (batched in this process on `device`).
        device: "cpu" or "cuda" (torch backend only).
        workers: processes for the pool (0 = os.cpu_count(); 1 = run in this process); also the I/O
            threads of the torch backend.
        overwrite: recompute every map (otherwise only missing maps and maps whose inputs changed, as
            recorded in OUT/manifest.json).
        report, sheet: compute Dice (writes OUT/report.json) / draw OUT/report.png.
        quiet: no progress bars and no printed report.
        ids: only these image ids (all must be in the CSV).
        crf_batch: images per torch CRF batch.
        columns, coords, outside: how to read the CSV (see gaze.fixations.read_fixations).
    Returns:
        dict with counts (written/changed/skipped per step, missing images/masks), mean Dice per map type
        ("dice": {name: {"n", "soft_gt", "binary_gt"}}), per-image (soft, binary) Dice ("per_image"),
        wall times per phase ("time_s") and paths. Also written to OUT/report.json.
    """
    t0 = time.perf_counter()
    spec: DataSpec = load_spec(data)
    steps, workers, root, out_dir = check_options(spec, steps, crf_backend, device, workers, root, out_dir)
    counts: dict = {}
    jobs = make_jobs(csv_path, root, spec, out_dir, ids, columns, coords, outside, counts)
    check_images_found(jobs, csv_path, root, spec)
    if "heatmap" not in steps:  # before any folder is made
        check_heatmaps_exist(jobs)
    prepare_out(out_dir, steps)
    manifest = Manifest(out_dir)
    result = {"data": spec.name, "csv": str(csv_path), "root": str(root), "out_dir": str(out_dir), "n_ids": len(jobs),
              "steps": list(steps), "crf_backend": crf_backend, "device": device, "workers": workers,
              "written": {}, "changed": {}, "skipped": {}, "missing_images": [], "missing_masks": [],
              "images_without_fixations": [], "dropped_fixations": counts["dropped"], "time_s": {},
              "notes": [manifest.unreadable] if manifest.unreadable else []}
    known = {j.id for j in jobs}
    if (root / "images").is_dir() and ids is None:
        result["images_without_fixations"] = sorted(
            p.stem for p in (root / "images").glob(f"*{spec.image_ext}") if p.stem not in known)

    with LazyPool(workers, result["time_s"]) as pool:
        if "heatmap" in steps:
            run_heatmaps(jobs, manifest, pool, overwrite, quiet, result)
        if "crf" in steps:
            run_crf(jobs, manifest, pool, crf_backend, device, crf_batch, overwrite, quiet, result)
        if report:
            run_report(jobs, steps, pool, quiet, result)
    if sheet:
        t = time.perf_counter()
        rows = _sheet_rows(jobs)
        if rows:
            rep.save_sheet(rep.make_sheet(rows), out_dir / "report.png")
            result["sheet"] = str(out_dir / "report.png")
        result["time_s"]["sheet"] = time.perf_counter() - t
    result["time_s"]["total"] = time.perf_counter() - t0
    if report:
        try:
            write_json(out_dir / "report.json", result)
        except OSError as e:
            raise DataError(f"{out_dir / 'report.json'}: cannot write the report: {e.strerror or e}") from None
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
