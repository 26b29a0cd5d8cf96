"""Time the dense CRF: pydensecrf2 (C++) against gaze.crf_torch on CPU and CUDA, on real Kvasir images.

    python scripts/crf_torch_benchmark.py --images ../shared/data/kvasir-seg/images --n 20
    python scripts/crf_torch_benchmark.py --images IMGS --n 1000 --backends torch-cuda --batch-pixels 4194304,16777216
    python scripts/crf_torch_benchmark.py --images IMGS --n 16 --backends pydensecrf --save-ref REFDIR   # oracle maps
    python scripts/crf_torch_benchmark.py --images IMGS --n 16 --backends torch-cuda --ref REFDIR      # compare to them

Probability maps: the gray files in --probs (<id>.jpg or .png, /255, e.g. ROOT/gaze/heatmap) or, without it,
a synthetic gaze-like Gaussian blob quantised to /255. Timings cover the CRF only (images are decoded first),
including host-device copies; CUDA runs one warm-up batch first. Prints a table and can write JSON.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gaze.crf_torch import crf_refine_torch_batch  # noqa: E402

PAPER = dict(sxy=80.0, srgb=13.0, compat=1.0, n_iter=10)


def blob_prob(h: int, w: int, seed: int) -> np.ndarray:
    """A gaze-heatmap-like map: one Gaussian blob at a random place, quantised to /255 like a saved heatmap."""
    rng = np.random.default_rng(seed)
    cx, cy, s = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.1, 0.25)
    ys, xs = np.mgrid[0:h, 0:w]
    p = np.exp(-((xs - cx * w) ** 2 + (ys - cy * h) ** 2) / (2 * (s * min(h, w)) ** 2))
    return (np.floor(p * 255) / 255).astype(np.float32)


def load(images_dir: Path, probs_dir, n: int, ids_file=None):
    if ids_file:
        ids = [line.strip() for line in open(ids_file) if line.strip()][:n]
        paths = [images_dir / f"{i}.jpg" for i in ids]
    else:
        paths = sorted(images_dir.glob("*.jpg"))[:n]
    if not paths:
        sys.exit(f"no .jpg images found in {images_dir}")
    images, probs = [], []
    for k, path in enumerate(paths):
        with Image.open(path) as im:
            images.append(np.array(im.convert("RGB")))
        if probs_dir:
            cands = [probs_dir / f"{path.stem}{ext}" for ext in (".jpg", ".png")]
            found = [c for c in cands if c.is_file()]
            if not found:
                sys.exit(f"no probability map for {path.stem} in {probs_dir}")
            with Image.open(found[0]) as im:
                probs.append(np.asarray(im.convert("L"), dtype=np.float32) / 255.0)
        else:
            probs.append(blob_prob(*images[-1].shape[:2], seed=k))
    return [p.stem for p in paths], images, probs


def run_pydensecrf(images, probs):
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    out = []
    for image, prob in zip(images, probs):
        h, w = prob.shape
        d = dcrf.DenseCRF2D(w, h, 2)
        d.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(np.stack([1 - prob, prob]), clip=1e-5)))
        d.addPairwiseBilateral(sxy=PAPER["sxy"], srgb=PAPER["srgb"], rgbim=np.array(image, order="C"),
                               compat=PAPER["compat"])
        out.append(np.asarray(d.inference(PAPER["n_iter"]))[1].reshape(h, w))
    return out


def timed(fn, sync=None):
    t = time.perf_counter()
    out = fn()
    if sync:
        sync()
    return out, time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=Path, required=True, help="folder of RGB .jpg images (Kvasir-SEG images/)")
    ap.add_argument("--probs", type=Path, help="folder of gray probability maps <id>.jpg/.png (default: blobs)")
    ap.add_argument("--ids", help="file of image ids to use, one per line (default: sorted folder)")
    ap.add_argument("--n", type=int, default=20, help="number of images")
    ap.add_argument("--backends", default="pydensecrf,torch-cpu,torch-cuda",
                    help="comma list of pydensecrf, torch-cpu, torch-cuda (CUDA skipped when unavailable)")
    ap.add_argument("--batch-pixels", default="8388608",
                    help="comma list of crf_refine_torch_batch group sizes (pixels) to time on CUDA")
    ap.add_argument("--cpu-batch-pixels", type=int, default=1, help="group size on CPU (1: one image at a time)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"], help="torch filtering precision")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--save-ref", type=Path, help="save the pydensecrf maps here as <id>.npy")
    ap.add_argument("--ref", type=Path, help="compare against maps saved by --save-ref instead of running pydensecrf")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    t0 = time.perf_counter()
    ids, images, probs = load(args.images, args.probs, args.n, args.ids)
    n_pix = sum(p.size for p in probs)
    print(f"{len(ids)} images, {n_pix / 1e6:.1f} Mpixels, decoded in {time.perf_counter() - t0:.1f} s; "
          f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, {os.cpu_count()} cores"
          + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no CUDA"))

    backends = args.backends.split(",")
    results, maps = [], {}
    ref = None
    if "pydensecrf" in backends:
        ref, sec = timed(lambda: run_pydensecrf(images, probs))
        results.append(dict(backend="pydensecrf", device="cpu", seconds=sec))
        if args.save_ref:
            args.save_ref.mkdir(parents=True, exist_ok=True)
            for i, q in zip(ids, ref):
                np.save(args.save_ref / f"{i}.npy", q.astype(np.float32))
    elif args.ref:
        ref = [np.load(args.ref / f"{i}.npy") for i in ids]

    if "torch-cpu" in backends:
        out, sec = timed(lambda: crf_refine_torch_batch(images, probs, device="cpu", dtype=dtype,
                                                        batch_pixels=args.cpu_batch_pixels, **PAPER))
        results.append(dict(backend="torch", device="cpu", dtype=args.dtype, seconds=sec))
        maps["torch-cpu"] = out
    if "torch-cuda" in backends and torch.cuda.is_available():
        for bp in [int(b) for b in args.batch_pixels.split(",")]:
            run = lambda bp=bp: crf_refine_torch_batch(images, probs, device="cuda", dtype=dtype,  # noqa: E731
                                                       batch_pixels=bp, **PAPER)
            k = 1  # warm-up on the first group (CUDA context, allocator, kernels)
            while k < len(probs) and sum(p.size for p in probs[:k]) < bp:
                k += 1
            crf_refine_torch_batch(images[:k], probs[:k], device="cuda", dtype=dtype, batch_pixels=bp, **PAPER)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            out, sec = timed(run, torch.cuda.synchronize)
            results.append(dict(backend="torch", device="cuda", dtype=args.dtype, batch_pixels=bp, seconds=sec,
                                peak_gib=torch.cuda.max_memory_allocated() / 2 ** 30))
            print(f"torch cuda, groups of {bp} pixels: {sec:.2f} s", flush=True)
            maps[f"torch-cuda-{bp}"] = out

    for r in results:
        r["ms_per_image"] = 1000 * r["seconds"] / len(ids)
        key = "torch-cpu" if r["device"] == "cpu" and r["backend"] == "torch" else f"torch-cuda-{r.get('batch_pixels')}"
        if r["backend"] == "torch" and ref is not None:
            r["max_abs_diff_vs_pydensecrf"] = float(max(np.abs(a - b).max() for a, b in zip(maps[key], ref)))
        if r["backend"] == "torch" and "torch-cpu" in maps and key != "torch-cpu":
            diffs = [np.abs(a - b).max() for a, b in zip(maps[key], maps["torch-cpu"])]
            r["max_abs_diff_vs_torch_cpu"] = float(max(diffs))

    print(f"{'backend':<12}{'device':<8}{'batch px':>10}{'total s':>10}{'ms/image':>10}{'max|diff| ref':>15}"
          f"{'vs torch-cpu':>14}{'peak GiB':>10}")
    fmt = lambda v, f: (f"{v:{f}}" if v is not None else "-")  # noqa: E731
    for r in results:
        print(f"{r['backend']:<12}{r['device']:<8}{fmt(r.get('batch_pixels'), 'd'):>10}{r['seconds']:>10.2f}"
              f"{r['ms_per_image']:>10.1f}{fmt(r.get('max_abs_diff_vs_pydensecrf'), '.2e'):>15}"
              f"{fmt(r.get('max_abs_diff_vs_torch_cpu'), '.2e'):>14}{fmt(r.get('peak_gib'), '.2f'):>10}")
    if args.json:
        args.json.write_text(json.dumps(dict(n_images=len(ids), megapixels=n_pix / 1e6, results=results), indent=1))


if __name__ == "__main__":
    main()
