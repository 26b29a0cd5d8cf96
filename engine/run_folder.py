"""The run folder: EXP/<seed>/<data>/<run_id>_<timestamp>/ with log.txt, config.yaml, data_spec.yaml,
metrics.json, losses.csv, TensorBoard events and checkpoints. Nothing here is ever overwritten by a new run.
A run's identity (what the sweep and summarize compare) is common.identity.run_identity."""
import fcntl
import logging
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import yaml

from common.checksums import BUNDLE_CARD, BUNDLE_WEIGHTS, is_bundle, verify_folder
from common.dataspec import DataSpec, load_spec, spec_record
from common.errors import UserError
from common.files import write_json, write_text_atomic  # noqa: F401  (write_json re-exported for the engine)
from common.identity import SPEC_FILE, read_recorded_spec  # noqa: F401  (re-exported for the engine)
from parse_args import COMMANDS

LOG_SLACK_BYTES = 64 * 1024 ** 2  # logs, losses.csv, TensorBoard events, predictions of a small split


class RunError(UserError):
    """A problem with the run itself (unwritable folder, full disk, diverged loss...)."""


def resolve_checkpoint(path, in_run_folder: str = "model_best.pth") -> Path:
    """A checkpoint file, a run folder meaning its `in_run_folder` checkpoint, or a release bundle (run.py export)
    meaning its weights.pth once every file of the bundle matches its SHA256SUMS."""
    if not path:
        raise RunError("--ckpt_path is required here (a .pth file, a run folder or an exported bundle)")
    path = Path(path)
    if is_bundle(path):
        verify_folder(path, required=(BUNDLE_WEIGHTS, BUNDLE_CARD))
        return path / BUNDLE_WEIGHTS
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


def data_name(args) -> str:
    """The <data> folder of runs: the dataset spec's name (never a path, even for --data some/spec.yaml)."""
    from common.dataspec import load_spec
    return load_spec(args.data).name


def recorded_settings(args) -> dict:
    """What config.yaml (and a checkpoint's "args") records: every setting, no one-shot command key; the
    dataset as given at training (a spec file by its absolute path)."""
    settings = {k: v for k, v in vars(args).items() if k not in COMMANDS}
    data = settings.get("data")
    if isinstance(data, DataSpec):  # a later command runs on the spec the run recorded
        settings["data"] = data.source
    elif data is not None and (str(data).endswith((".yaml", ".yml")) or "/" in str(data)):
        settings["data"] = str(Path(data).absolute())
    return settings


def data_spec_of(args) -> dict:
    """The resolved dataset spec of the settings (every key), as recorded in RUN/data_spec.yaml."""
    return spec_record(load_spec(args.data))


class RunLock:
    """RUN/.lock, held (fcntl.flock) by the one process that trains in RUN, for its whole life; it holds that
    process's pid. Taken once at start (nothing per iteration); the kernel drops it when the process ends,
    however it ends, so a stale lock of a dead process is simply taken over. --test and predict only read
    and never take it."""

    NAME = ".lock"

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / self.NAME
        self.fd: int | None = None

    def acquire(self) -> "RunLock":
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise RunError(f"cannot lock the run folder {self.path.parent}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise RunError(f"{self.path.parent} is in use: another process (pid {holder}) trains in it; wait for "
                           f"it to end (--test and predict may read the run meanwhile)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


_LOCKS: list = []  # the run folder locks this process holds (the kernel releases them when it exits)


def lock_run(run_dir: Path) -> None:
    _LOCKS.append(RunLock(run_dir).acquire())


def check_resume_exp_path(run_dir: Path, explicit: dict) -> None:
    """--resume continues a run in its own folder: an --exp_path elsewhere is refused, not ignored."""
    exp = explicit.get("exp_path")
    if exp is None or (Path(exp).resolve() in run_dir.resolve().parents):
        return
    raise RunError(f"--exp_path {exp}: --resume continues the run in its own folder {run_dir}; to continue it "
                   f"elsewhere, copy the folder there and resume the copy")


def release_locks() -> None:
    while _LOCKS:
        _LOCKS.pop().release()


def log_file_only(log, text: str) -> None:
    """`text` into the run's log.txt only: `cli` prints the one error line on the console."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, text, None, None)
    for handler in log.handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def check_exp_path(exp_path, need_bytes: int) -> None:
    """Before anything is created: --exp_path can be made writable and its disk holds `need_bytes`."""
    path = Path(exp_path).absolute()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        what = "is not a folder" if existing.exists() and not existing.is_dir() else "is not writable"
        raise RunError(f"cannot write to --exp_path {exp_path}: {existing} {what}")
    free = shutil.disk_usage(existing).free
    if free < need_bytes:
        hint = " (fewer with a larger --save_step)" if need_bytes > 4 * LOG_SLACK_BYTES else ""
        raise RunError(f"only {free / 1024 ** 2:.0f} MiB free under {existing}; this run's checkpoints and logs "
                       f"need about {need_bytes / 1024 ** 2:.0f} MiB{hint}")


def expected_run_bytes(checkpoint_bytes: int, args) -> int:
    """Disk a run needs: model_latest, model_best, one temporary copy while saving, every model_ite<N>, logs."""
    return checkpoint_bytes * (3 + args.max_ite // args.save_step) + LOG_SLACK_BYTES


def create_run_dir(args, kind: str = "") -> Path:
    """A fresh run folder EXP/<seed>/<data>/<run_id><kind>_<timestamp>; a clear error if EXP is unwritable."""
    base = Path(args.exp_path) / str(args.seed) / data_name(args)
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
    except OSError as e:
        raise RunError(f"cannot write to --exp_path {args.exp_path}: {e}") from e
    return path


class _TqdmHandler(logging.Handler):
    def emit(self, record):
        from tqdm import tqdm
        tqdm.write(self.format(record), file=sys.stdout)


class _Buffer(logging.Handler):
    """Keeps the records logged before the run folder exists, for its log.txt."""

    def __init__(self):
        super().__init__()
        self.records = []

    def emit(self, record):
        self.records.append(record)


FORMAT = logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S")


def setup_logger(run_dir: Path | None = None, quiet: bool = False, rank: int = 0) -> logging.Logger:
    """The run's logger: console, and log.txt of `run_dir` (appended). Without a folder yet, records are
    kept until `attach_log_file` (a command that fails before training leaves no folder behind)."""
    logger = logging.getLogger("gazesup")
    for handler in logger.handlers:
        handler.close()
    logger.handlers.clear()
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    logger.propagate = False
    console = _TqdmHandler()  # log lines above the progress bar, not through it
    console.setFormatter(FORMAT)
    logger.addHandler(console)
    if rank == 0:
        if run_dir is not None:
            attach_log_file(logger, run_dir)
        else:
            logger.addHandler(_Buffer())
    return logger


class _LogFile(logging.FileHandler):
    """RUN/log.txt; a failing write (a full disk...) warns once on the console and the file is no longer
    written (instead of a "--- Logging error ---" traceback for every later line)."""

    failed = False

    def emit(self, record):
        if not self.failed:
            super().emit(record)

    def close(self):
        try:  # the last flush on a full disk: already warned about
            super().close()
        except OSError:
            pass

    def handleError(self, record):
        if not self.failed:
            self.failed = True
            e = sys.exc_info()[1]
            print(f"warning: cannot write {self.baseFilename} ({e}); the log goes on on the console only, "
                  "training goes on", file=sys.stderr, flush=True)


def attach_log_file(logger: logging.Logger, run_dir: Path) -> None:
    """Send the logger to RUN/log.txt (appending: a resumed run continues its log), with what was buffered."""
    handler = _LogFile(run_dir / "log.txt", mode="a")
    handler.setFormatter(FORMAT)
    for buffer in [h for h in logger.handlers if isinstance(h, _Buffer)]:
        for record in buffer.records:
            handler.emit(record)
        logger.removeHandler(buffer)
    logger.addHandler(handler)


def save_config(args, run_dir: Path) -> None:
    """RUN/config.yaml (the settings, usable as --config of a new run) and RUN/data_spec.yaml (the resolved
    dataset spec: later commands use it, not the spec file, which may have changed since)."""
    write_text_atomic(run_dir / SPEC_FILE, yaml.safe_dump(data_spec_of(args), sort_keys=False))
    write_text_atomic(run_dir / "config.yaml", yaml.safe_dump(recorded_settings(args), sort_keys=False))


def open_tensorboard(run_dir: Path, purge_step, log: logging.Logger) -> "SafeWriter":
    """The run's TensorBoard writer; a disk already full when it opens warns once (training goes on)."""
    from torch.utils.tensorboard import SummaryWriter
    try:
        return SafeWriter(SummaryWriter(str(run_dir), purge_step=purge_step), log)
    except OSError as e:
        writer = SafeWriter(None, log)
        writer._fail(e)
        return writer


class SafeWriter:
    """A TensorBoard writer whose failures (a full disk...) warn once and stop its logging; the run goes on."""

    def __init__(self, writer, log: logging.Logger):
        self._writer, self._log, self.failed = writer, log, False
        self._lock = threading.Lock()
        # TensorBoard writes from its own thread: a failure there would print a traceback; it warns once instead
        self._previous_hook = threading.excepthook
        threading.excepthook = self._thread_failed

    def _fail(self, e: BaseException) -> None:
        with self._lock:
            if self.failed:
                return
            self.failed = True
        self._log.warning(f"warning: TensorBoard logging stopped ({e}); training goes on")

    def _thread_failed(self, hook_args) -> None:
        if isinstance(hook_args.exc_value, OSError) and "AsyncWriter" in type(hook_args.thread).__name__:
            self._fail(hook_args.exc_value)
        else:
            self._previous_hook(hook_args)

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)

        def call(*args, **kwargs):
            if self.failed:
                if name == "close":
                    threading.excepthook = self._previous_hook
                return None
            try:
                return getattr(self._writer, name)(*args, **kwargs)
            except OSError as e:
                self._fail(e)
            finally:
                if name == "close":
                    threading.excepthook = self._previous_hook
        return call


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
            dice, iou = 100 * metrics[f"mdice_{i}"], 100 * metrics[f"miou_{i}"]
            lines.append(f"{'level ' + str(i):<12} {dice:8.2f} {iou:8.2f}")
    if "mhd95" in metrics:
        lines.append(f"HD95 (px): {metrics['mhd95']:.2f}")
    return "\n".join(lines)
