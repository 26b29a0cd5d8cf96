"""Helpers the tests share: a seconds-long synthetic training run for CPU tests, and the check of a user error's
one line. (Fixtures are in conftest.py.)"""
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from prepare.synthetic import make_synthetic_dataset

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = ["--features", "8,8,16,16,32,8", "--feat_dim", "8", "--spatial_size", "32"]


def tiny_dataset(root: Path, num_train: int = 8, num_test: int = 4) -> Path:
    """A synthetic Kvasir-layout dataset whose gaze maps are blurred masks (no CRF: fast), in ROOT/gaze/crf_compat1."""
    make_synthetic_dataset(root, num_train=num_train, num_test=num_test, size_range=(40, 56))
    gaze = root / "gaze" / "crf_compat1"
    gaze.mkdir(parents=True)
    for path in sorted((root / "masks").glob("*.jpg")):
        mask = np.asarray(Image.open(path).convert("L"), np.float32) / 255
        blurred = ndimage.gaussian_filter(mask, 2)
        Image.fromarray(np.round(blurred / blurred.max() * 255).astype(np.uint8)).save(gaze / path.name, quality=95)
    return root


def tiny_argv(root: Path, exp: Path, *extra: str) -> list:
    """Flags of a seconds-long CPU run: narrow 2-level model, 32 px, SGD."""
    return (["-m", "gaze_sup", "--data", "kvasir", "--root", str(root), "--exp_path", str(exp), "--num_worker", "0",
             "-bs", "4", "--opt", "sgd", "--lr", "1e-2", "--seed", "0"] + TINY_MODEL + list(extra))


def only_run_dir(exp: Path) -> Path:
    runs = sorted(p for p in (exp / "0" / "kvasir").iterdir() if p.is_dir())
    assert len(runs) == 1, runs
    return runs[0]


def one_error_line(err: str) -> str:
    """The whole stderr of a refused command is one `error: ...` line (no warning, no traceback); returns it."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


NARROW = {"features": [8, 8, 16, 16, 32, 8], "feat_dim": 8}  # the widths of TINY_MODEL


def random_checkpoint(path: Path, method="gaze_sup", in_channels=3, data="kvasir", spatial_size=32, paper=False,
                      seed=0):
    """A randomly initialised narrow model (2 levels for gaze_sup) saved as this project does (with "args") or
    as the paper does; returns the model."""
    import torch

    from models.checkpoint import save_checkpoint
    from models.segmentation_net import build_model

    torch.manual_seed(seed)
    model = build_model(method, num_levels=2, in_channels=in_channels, **NARROW)
    if paper:
        state = {"state_dict": model.state_dict(), "opt": {}, "epoch": 1, "iteration": 0,
                 "best_performance": np.float64(0.5), "best_iteration": 0}
    else:
        state = {"state_dict": model.state_dict(), "iteration": 0,
                 "args": dict(method=method, num_levels=2, in_channels=in_channels, data=data,
                              spatial_size=spatial_size, **NARROW)}
    save_checkpoint(path, state)
    return model
