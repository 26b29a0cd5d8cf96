"""The run folder: EXP/<seed>/<data>/<run_id>_<timestamp>/ with log.txt, config.yaml, metrics.json,
losses.csv, TensorBoard events and checkpoints. Nothing here is ever overwritten by a new run."""
import logging
import shutil
import sys
import time
from pathlib import Path

import yaml

from common.errors import UserError
from common.files import write_json  # noqa: F401  (re-exported for the engine)

MIN_FREE_BYTES = 2 * 1024 ** 3


class RunError(UserError):
    """A problem with the run itself (unwritable folder, full disk, diverged loss...)."""


def resolve_checkpoint(path, in_run_folder: str = "model_best.pth") -> Path:
    """A checkpoint file, or a run folder meaning its `in_run_folder` checkpoint."""
    if not path:
        raise RunError("--ckpt_path is required here (a .pth file or a run folder)")
    path = Path(path)
    if path.is_dir():
        path = path / in_run_folder
    if not path.is_file():
        raise RunError(f"checkpoint not found: {path}")
    return path


def run_id(args) -> str:
    if args.run_name:
        return args.run_name
    if args.method == "full_sup":
        return "full_sup"
    return f"gaze_sup_{args.num_levels}levels_{args.cons_mode}{args.cons_weight:g}"


def create_run_dir(args, kind: str = "") -> Path:
    """A fresh run folder; fails early with a clear message if EXP is unwritable or the disk nearly full."""
    base = Path(args.exp_path) / str(args.seed) / args.data
    stamp = time.strftime("%Y%m%d-%H%M%S")
    try:
        base.mkdir(parents=True, exist_ok=True)
        for n in range(1000):
            path = base / f"{run_id(args)}{kind}_{stamp}" if n == 0 else base / f"{run_id(args)}{kind}_{stamp}-{n}"
            try:
                path.mkdir()
                break
            except FileExistsError:
                continue
        probe = path / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise RunError(f"cannot write to --exp_path {args.exp_path}: {e}") from e
    free = shutil.disk_usage(path).free
    if free < MIN_FREE_BYTES:
        raise RunError(f"only {free / 1024 ** 2:.0f} MiB free under {path}; checkpoints need more "
                       f"(at least {MIN_FREE_BYTES / 1024 ** 3:.0f} GiB)")
    return path


class _TqdmHandler(logging.Handler):
    def emit(self, record):
        from tqdm import tqdm
        tqdm.write(self.format(record), file=sys.stdout)


def setup_logger(run_dir: Path, quiet: bool = False, rank: int = 0) -> logging.Logger:
    logger = logging.getLogger("gazesup")
    logger.handlers.clear()
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    logger.propagate = False
    fmt = logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S")
    console = _TqdmHandler()  # log lines above the progress bar, not through it
    console.setFormatter(fmt)
    logger.addHandler(console)
    if rank == 0 and run_dir is not None:
        handler = logging.FileHandler(run_dir / "log.txt")
        handler.setFormatter(fmt)
        logger.addHandler(handler)
    return logger


def save_config(args, run_dir: Path) -> None:
    (run_dir / "config.yaml").write_text(yaml.safe_dump(vars(args), sort_keys=False))


def write_rows_csv(path: Path, rows: list) -> None:
    """Per-image metrics: one row per image, columns from the first row."""
    keys = list(rows[0])
    lines = [",".join(keys)] + [",".join(_fmt(r[k]) for k in keys) for r in rows]
    path.write_text("\n".join(lines) + "\n")


def _fmt(v) -> str:
    return f"{v:.6f}" if isinstance(v, float) else str(v)


def metrics_table(metrics: dict, num_levels: int = 0) -> str:
    """A short text table: the evaluated prediction and each level."""
    lines = [f"{'prediction':<12} {'Dice':>8} {'IoU':>8}"]
    lines.append(f"{'ensemble' if num_levels > 1 else 'model':<12} {100 * metrics['mdice']:8.2f} "
                 f"{100 * metrics['miou']:8.2f}")
    for i in range(1, num_levels + 1):
        if f"mdice_{i}" in metrics:
            lines.append(f"{'level ' + str(i):<12} {100 * metrics[f'mdice_{i}']:8.2f} {100 * metrics[f'miou_{i}']:8.2f}")
    if "mhd95" in metrics:
        lines.append(f"HD95 (px): {metrics['mhd95']:.2f}")
    return "\n".join(lines)
