"""Time the gaze steps per image: the fast heatmap against the direct scipy recipe, and the CRF backends.

    python scripts/gaze_benchmark.py --csv ../shared/data/gazemedseg/kvasir_fixation.csv \
        --root ../shared/data/kvasir-seg --data kvasir --n 20 [--torch-device cuda] [--batch 16]
    python scripts/gaze_benchmark.py --synthetic --n 64 --torch-device cuda   # no data needed

Prints milliseconds per image (single process; pin threads with OMP_NUM_THREADS etc. if wanted) and the
largest difference between the methods. Timing lives here, never in tests.
"""
import argparse
import sys
import time
from pathlib import Path

import cv2
import numpy as np
from scipy.ndimage import gaussian_filter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common.dataspec import builtin_specs, load_spec  # noqa: E402
from gaze.heatmap import fixation_canvas, heatmap_f32, minmax, to_uint8  # noqa: E402


def direct_heatmap(f, h, w, sigma):
    """The paper's recipe with a full 2-D scipy filter (the reference)."""
    g = minmax(gaussian_filter(fixation_canvas(f), sigma))
    return cv2.resize(g, (w, h), interpolation=cv2.INTER_CUBIC)


def synthetic(n: int, seed: int = 0) -> list:
    """Kvasir-like samples: (image RGB uint8 ~530 x 620, fixations, H, W) with a bright blob."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        h, w = int(rng.integers(500, 560)), int(rng.integers(560, 680))
        yy, xx = np.mgrid[:h, :w]
        cy, cx = h * rng.uniform(0.3, 0.7), w * rng.uniform(0.3, 0.7)
        inside = ((yy - cy) / (0.2 * h)) ** 2 + ((xx - cx) / (0.2 * w)) ** 2 <= 1
        base = np.where(inside[..., None], (200, 120, 110), (150, 60, 50)) + rng.normal(0, 10, (h, w, 3))
        image = cv2.GaussianBlur(np.clip(base, 0, 255).astype(np.uint8), (5, 5), 0)
        k = int(rng.integers(5, 99))
        f = np.c_[np.clip(cx / w + rng.normal(0, 0.08, k), 0, 1), np.clip(cy / h + rng.normal(0, 0.08, k), 0, 1),
                  rng.integers(50, 1500, k)]
        out.append((image, f, h, w))
    return out


def real(csv, root, data: str, n: int) -> list:
    from gaze.fixations import read_fixations
    from gaze.pipeline import load_crf_image
    fix = read_fixations(csv)
    out = []
    for iid, fs in sorted(fix.items()):
        path = Path(root) / "images" / f"{iid}{load_spec(data).image_ext}"
        if path.is_file():
            out.append((load_crf_image(path), fs.fixations, fs.height, fs.width))
        if len(out) == n:
            break
    return out


def ms(t0: float, n: int) -> float:
    return (time.perf_counter() - t0) / n * 1000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--csv")
    p.add_argument("--root")
    p.add_argument("--data", default="kvasir", choices=builtin_specs())
    p.add_argument("--synthetic", action="store_true", help="generated Kvasir-like images instead of --csv/--root")
    p.add_argument("--n", type=int, default=20)
    p.add_argument("--direct", type=int, default=3, help="images for the (slow) direct scipy heatmap")
    p.add_argument("--no-pydensecrf", action="store_true")
    p.add_argument("--torch-device", default=None, help="also time the torch backend on this device (cpu, cuda)")
    p.add_argument("--batch", type=int, default=16)
    a = p.parse_args()
    samples = synthetic(a.n) if a.synthetic else real(a.csv, a.root, a.data, a.n)
    sigma = load_spec(a.data).heatmap_sigma
    print(f"{len(samples)} images, mean size {np.mean([s[2] * s[3] for s in samples]) / 1e3:.0f} kpx")

    t = time.perf_counter()
    heat = [heatmap_f32(f, h, w, sigma) for _, f, h, w in samples]
    print(f"heatmap (separable sparse): {ms(t, len(samples)):8.1f} ms/image")
    k = min(a.direct, len(samples))
    if k:
        t = time.perf_counter()
        ref = [direct_heatmap(f, h, w, sigma) for _, f, h, w in samples[:k]]
        print(f"heatmap (direct scipy):     {ms(t, k):8.1f} ms/image; "
              f"max |diff| {max(np.abs(x - y).max() for x, y in zip(heat, ref)):.1e}")
    probs = [to_uint8(x).astype(np.float32) / 255 for x in heat]  # what the CRF reads back
    images = [s[0] for s in samples]

    base = None
    if not a.no_pydensecrf:
        from gaze.crf import crf_refine_pydensecrf
        t = time.perf_counter()
        base = [crf_refine_pydensecrf(im, pr) for im, pr in zip(images, probs)]
        print(f"crf pydensecrf:             {ms(t, len(samples)):8.1f} ms/image")
    if a.torch_device:
        import torch

        from gaze.crf_torch import crf_refine_torch_batch
        sync = torch.cuda.synchronize if a.torch_device.startswith("cuda") else (lambda: None)
        crf_refine_torch_batch(images[:2], probs[:2], device=a.torch_device)  # warm-up
        sync()
        t = time.perf_counter()
        out = []
        for i in range(0, len(images), a.batch):
            out += crf_refine_torch_batch(images[i:i + a.batch], probs[i:i + a.batch], device=a.torch_device)
        sync()
        msg = f"crf torch ({a.torch_device}, batch {a.batch}): {ms(t, len(samples)):8.1f} ms/image"
        if base is not None:
            msg += f"; max |diff| vs pydensecrf {max(np.abs(x - y).max() for x, y in zip(out, base)):.1e}"
        print(msg)


if __name__ == "__main__":
    main()
