"""A small synthetic polyp-like dataset with simulated eye-gaze, in the real formats: the Kvasir layout
(images/, masks/, train.txt, test.txt) and a GazeMedSeg fixation CSV. Used by `run.py --demo` and tests."""
import csv
from pathlib import Path

import numpy as np
from PIL import Image

from gaze.fixations import GAZEMEDSEG_COLUMNS as CSV_COLUMNS


def polyp_image(rng: np.random.RandomState, height: int, width: int):
    """An endoscopy-like RGB image (uint8) with one elliptical 'polyp' and its binary mask."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    # mucosa: reddish, smooth shading, vessel-like noise
    shade = 0.75 + 0.25 * np.cos((xx / width - 0.5) * 2.0) * np.cos((yy / height - 0.5) * 2.0)
    noise = rng.normal(0, 1, (height // 8 + 2, width // 8 + 2)).astype(np.float32)
    noise = np.asarray(Image.fromarray(noise).resize((width, height), Image.BICUBIC))
    base = np.stack([200 * shade + 12 * noise, 95 * shade + 8 * noise, 85 * shade + 6 * noise], -1)
    # polyp: ellipse, brighter and more yellow, a soft highlight
    cy, cx = rng.uniform(0.3, 0.7) * height, rng.uniform(0.3, 0.7) * width
    ay, ax = rng.uniform(0.12, 0.25) * height, rng.uniform(0.12, 0.25) * width
    angle = rng.uniform(0, np.pi)
    c, s = np.cos(angle), np.sin(angle)
    u, v = ((xx - cx) * c + (yy - cy) * s) / ax, (-(xx - cx) * s + (yy - cy) * c) / ay
    r = np.sqrt(u ** 2 + v ** 2)
    mask = r <= 1.0
    bump = np.clip(1 - r, 0, 1)[..., None]
    polyp = np.array([235, 160, 120], np.float32) * (0.8 + 0.4 * bump)
    image = np.where(mask[..., None], polyp + 6 * noise[..., None], base)
    return np.clip(image, 0, 255).astype(np.uint8), mask, (cy, cx, ay, ax)


def simulated_fixations(rng: np.random.RandomState, height: int, width: int, shape) -> list:
    """(x, y, duration_ms) fixations: most on the polyp, a few wandering, like a reader checking the image."""
    cy, cx, ay, ax = shape
    fixations = []
    for _ in range(rng.randint(8, 20)):
        if rng.rand() < 0.8:
            y, x = cy + rng.normal(0, 0.45) * ay, cx + rng.normal(0, 0.45) * ax
            duration = rng.randint(200, 900)
        else:
            y, x = rng.uniform(0, height), rng.uniform(0, width)
            duration = rng.randint(60, 250)
        fixations.append((float(np.clip(x / width, 0, 1)), float(np.clip(y / height, 0, 1)), duration))
    return fixations


def make_synthetic_dataset(root, num_train: int = 48, num_test: int = 16, seed: int = 0,
                           size_range=(88, 128)) -> Path:
    """Write the dataset to `root` and return the fixation CSV path (root/fixations.csv).

    Args:
        root: output folder (Kvasir layout).
        num_train, num_test: number of images per split.
        seed: random seed (the dataset is deterministic given it).
        size_range: image heights and widths are drawn from this range, so sizes differ as in Kvasir.
    """
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(seed)
    ids, rows = [], []
    for n in range(num_train + num_test):
        image_id = f"synth{n:04d}"
        h, w = rng.randint(*size_range), rng.randint(*size_range)
        image, mask, shape = polyp_image(rng, h, w)
        Image.fromarray(image).save(root / "images" / f"{image_id}.jpg", quality=95)
        Image.fromarray(mask.astype(np.uint8) * 255).convert("RGB").save(root / "masks" / f"{image_id}.jpg")
        start = 0
        for k, (x, y, d) in enumerate(simulated_fixations(rng, h, w, shape), 1):
            rows.append([f"{image_id}.jpg", k, x, y, d, 1500, start, f"{h:.1f}", f"{w:.1f}"])
            start += d + 30
        ids.append(image_id)
    (root / "train.txt").write_text("\n".join(ids[:num_train]) + "\n")
    (root / "test.txt").write_text("\n".join(ids[num_train:]) + "\n")
    csv_path = root / "fixations.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        writer.writerows(rows)
    return csv_path
