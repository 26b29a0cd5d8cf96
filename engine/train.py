"""The paper's training schedule: iterations grouped into epochs, the learning rate set at the start of
each epoch, evaluation every val_step, checkpoints every save_step."""
import csv
import hashlib
import math
import os
import random
import signal
import time
from pathlib import Path

import numpy as np
import torch

from datasets.batches import TrainBatches
from datasets.segmentation import SegmentationDataset, level_thresholds
from engine import restore
from engine.distributed import DistContext
from engine.evaluate import TestData, autocast, evaluate
from engine.run_folder import RunError, data_spec_of, metrics_table, recorded_settings, write_json, write_rows_csv
from engine.visualize import log_images
from losses import full_sup_loss, gaze_sup_loss
from models.checkpoint import save_checkpoint
from models.segmentation_net import MULTI_LEVEL_METHODS


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True


def make_model(args) -> torch.nn.Module:
    """The run's network (engine.restore.make_model on the flags)."""
    return restore.make_model(vars(args))


def build_optimizer(args, model: torch.nn.Module) -> torch.optim.Optimizer:
    """SGD (momentum 0.99, Nesterov) or Adam, weight decay on every parameter, as the paper."""
    params = model.parameters()
    if args.opt == "sgd":
        return torch.optim.SGD(params, lr=args.lr, momentum=0.99, nesterov=True, weight_decay=args.weight_decay)
    return torch.optim.Adam(params, lr=args.lr, weight_decay=args.weight_decay)


def lr_at_epoch(args, epoch: int, total_epoch: int) -> float:
    """The learning rate of the 1-based `epoch`, exactly as the authors' training loop sets it.

    Their loop (trainers/base.py `run()`) calls the epoch-begin hook, which sets the lr from its epoch
    counter, *before* incrementing that counter, and the counter starts at 1. So epochs 1 and 2 both train
    at the schedule's value for 1, and epoch k >= 2 at its value for k - 1. The schedule itself
    (utils `adjust_learning_rate`): linear warm-up while the counter is below --warmup_ite (compared with
    epochs, not iterations), then a half cosine from --lr to --lr_min over `total_epoch` epochs.
    Being a function of the epoch alone, the same value comes back on resume.

    Args:
        args: flags; uses lr, lr_min, lr_scheduler ("cos" or anything else for a constant --lr), warmup_ite.
        epoch: the 1-based epoch about to be trained.
        total_epoch: max_ite // steps_per_epoch + 1, as the authors compute it.
    """
    if args.lr_scheduler != "cos":
        return args.lr
    counter = max(epoch - 1, 1)  # the authors' epoch counter when their hook runs for this epoch
    warmup = args.warmup_ite
    if counter < warmup:
        return args.lr * counter / warmup
    # their expression, in their order of operations (bit-identical values). counter <= total_epoch - 1 for
    # every epoch that trains, so the denominator is >= 1; max() only guards a direct call past the end
    return args.lr_min + (args.lr - args.lr_min) * 0.5 * (
        1.0 + math.cos(math.pi * (counter - warmup) / max(total_epoch - warmup, 1)))


ETA_WARN_SECONDS = 24 * 3600
ETA_SAMPLE_STEPS = 2  # steps timed after the first (warm-up) before the ETA check: CPU steps can take a minute


def schedule_warning(args, steps_per_epoch: int) -> str | None:
    """A warning when the per-epoch cosine schedule cannot do its job: under two epochs the authors' loop
    (see lr_at_epoch) trains at one constant lr, --lr_min itself when the run is under one epoch."""
    if args.lr_scheduler != "cos" or args.max_ite >= 2 * steps_per_epoch:
        return None
    total_epoch = args.max_ite // steps_per_epoch + 1
    lrs = sorted({lr_at_epoch(args, e, total_epoch) for e in range(1, total_epoch + 1)})
    return (f"warning: --max_ite {args.max_ite} is under two epochs ({steps_per_epoch} steps each); the per-epoch "
            f"cosine schedule (the paper's code) then trains at lr {', '.join(f'{v:.3g}' for v in lrs)} "
            f"throughout{' (--lr_min)' if lrs == [args.lr_min] else ''}, so the run may learn little. Train at "
            f"least {2 * steps_per_epoch} iterations, or use --lr_scheduler none")


def eta_warning(remaining_iterations: int, seconds_per_iteration: float, device) -> str | None:
    """A warning when the rest of the run would take over a day at the measured speed."""
    eta = remaining_iterations * seconds_per_iteration
    if eta <= ETA_WARN_SECONDS:
        return None
    hint = " (on the CPU: see the CPU preset, --config kvasir_cpu)" if getattr(device, "type", "") == "cpu" else ""
    return (f"warning: at {1000 * seconds_per_iteration:.0f} ms/it the remaining {remaining_iterations} iterations "
            f"take about {eta / 3600:.0f} hours{hint}")



def split_ids(args):
    """Training ids and, with --val_fraction, a seeded held-out validation subset (used to select model_best)."""
    from datasets.io import read_ids
    ids = read_ids(Path(args.root) / f"{args.train_split}.txt")
    ids = ids[:int(len(ids) * args.data_size_rate)]
    if args.val_fraction <= 0:
        return ids, None
    order = np.random.RandomState(args.seed).permutation(len(ids))
    n_val = max(1, round(len(ids) * args.val_fraction))
    val = set(order[:n_val].tolist())
    return [i for k, i in enumerate(ids) if k not in val], [i for k, i in enumerate(ids) if k in val]


def test_dataset(args, split=None) -> SegmentationDataset:
    return SegmentationDataset(args.root, args.data, split or args.test_split, train=False, method=args.method,
                               spatial_size=args.spatial_size)


def available_memory(device: torch.device) -> float:
    """Free bytes on the GPU, or the machine's available RAM (inf when unknown)."""
    if device.type == "cuda":
        return float(torch.cuda.mem_get_info(device)[0])
    try:
        return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return math.inf


def preload_fits(dataset: SegmentationDataset, device: torch.device, share: float = 0.25,
                 available: float | None = None) -> bool:
    """--preload auto: keep the resized training set (float32 images, uint8 targets) when it takes at most
    `share` of the free memory where it would live (`available` bytes; measured when None)."""
    levels = dataset.target_levels()
    need = len(dataset) * dataset.size ** 2 * (4 * dataset.spec.in_channels + levels)
    return need <= share * (available_memory(device) if available is None else available)


class StopFlag:
    """Turns SIGINT/SIGTERM into a request to checkpoint and stop after the current iteration;
    a second signal stops at once (KeyboardInterrupt), for a run stuck in a long evaluation."""

    def __init__(self):
        self.signal = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:
            self.ignore_from_now()  # raised once: a third signal during the unwinding is ignored
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopping without a checkpoint")
        self.signal = signal.Signals(signum).name

    def ignore_from_now(self) -> None:
        """The process is on its way out (status 130, one line): later signals must not kill it. SIG_IGN, not a
        Python handler, as Python puts its handlers back to the default while it shuts down."""
        for sig in self._old:
            signal.signal(sig, signal.SIG_IGN)

    def __exit__(self, *exc):
        if self.signal is not None:  # stopping after a checkpoint
            self.ignore_from_now()
            return
        for sig, old in self._old.items():
            signal.signal(sig, old)


class Trainer:
    """Trains one run. All files are written by rank 0 only.

    The model (and its initial weights) is built from the seed before any data is read, as the paper's
    code does, so --preload and --val_fraction cannot change the initial weights.

    Args:
        args: the resolved flags.
        run_dir: the run folder (the same path on every rank); may be set later, before `fit`.
        device: torch device.
        dist_ctx: data-parallel context.
        log: logger.
        writer: optional TensorBoard SummaryWriter.
        model: the network, already built from the seed (built here when None).
    """

    def __init__(self, args, run_dir: Path | None, device: torch.device, dist_ctx: DistContext, log,
                 writer=None, model: torch.nn.Module | None = None):
        self.args, self.run_dir, self.device, self.dist, self.log = args, run_dir, device, dist_ctx, log
        self.writer = writer
        if model is None:
            seed_everything(args.seed, args.deterministic)
            model = make_model(args)
        self.model = model.to(device)
        if args.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.optimizer = build_optimizer(args, self.model)
        self.scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
        self.main_metric = "mdice" if args.method in MULTI_LEVEL_METHODS else "miou"
        self.load_data()
        self.net = self.model
        if dist_ctx.enabled:  # `head` is in the state dict but unused in forward
            self.net = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)
        if args.compile:  # static shapes: a partial last batch gets its own graph, not a dynamic one for all
            self.net = torch.compile(self.net, dynamic=False)
        # small CPU collectives (stop requests, loss checks, logged means) go through gloo: no GPU sync
        self.cpu_group = None
        if dist_ctx.enabled:
            import torch.distributed as dist
            self.cpu_group = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        self.iteration, self.best, self.best_iteration = 0, -math.inf, 0
        self.history = []
        self.window = []  # per-step logs since the last losses.csv row (checkpointed: exact rows after a resume)
        self.final = None  # (metrics, rows) of the last evaluation at max_ite
        self.seconds_before = 0.0  # training time of the run's earlier segments (before a resume)
        self._t0 = time.time()
        self._preview = None  # training images shown in TensorBoard
        self._log_clock = None  # (time, iteration) of the last log line, for ms/it
        self._losses_failed = False
        self.data_spec = data_spec_of(args)  # recorded in every checkpoint (read once, not per save)
        self.steps_per_epoch = len(self.batches)
        self.total_epoch = args.max_ite // self.steps_per_epoch + 1

    def load_data(self) -> None:
        """The training batches, the decoded test split and the optional validation split."""
        args, device, dist_ctx = self.args, self.device, self.dist
        train_ids, val_ids = split_ids(args)
        thresholds = level_thresholds(args.data, args.num_levels, args.thresholds) if args.method == "gaze_sup" else []
        train_set = SegmentationDataset(args.root, args.data, train_ids, train=True, method=args.method,
                                        spatial_size=args.spatial_size, thresholds=thresholds, gaze_dir=args.gaze_dir,
                                        label_dir=getattr(args, "label_dir", None),
                                        ignore_below=getattr(args, "ignore_below", None), num_levels=args.num_levels)
        self.check_channels(train_set)
        workers = args.num_worker
        preload = args.preload == "yes" or (args.preload == "auto" and preload_fits(train_set, device))
        self.log.info(f"training set {'preloaded on ' + str(device) if preload else 'decoded every step'} "
                      f"(--preload {args.preload})")
        self.batches = TrainBatches(train_set, args.batch_size, args.seed, device, preload=preload,
                                    num_workers=workers, rank=dist_ctx.rank, world_size=dist_ctx.world_size)
        self.test_data = TestData(test_dataset(args), device, workers, dist_ctx.rank, dist_ctx.world_size)
        self.val_data = (TestData(test_dataset(args, val_ids), device, workers, dist_ctx.rank, dist_ctx.world_size)
                         if val_ids else None)

    def check_channels(self, dataset: SegmentationDataset) -> None:
        channels = dataset.load_image(0).shape[0]
        if channels != self.args.in_channels:
            raise RunError(f"--in_channels is {self.args.in_channels} but {dataset.image_path(0)} has {channels} "
                           f"channel(s) after loading (--data {self.args.data})")

    # ---------------------------------------------------------------- checkpoints
    def state(self, windows: list | None = None) -> dict:
        """The paper's checkpoint keys plus what an exact resume needs (`windows`: every rank's losses since
        the last losses.csv row; this rank's alone when None)."""
        if windows is None:
            windows = [self.cpu_window()]
        return {"state_dict": self.model.state_dict(), "opt": self.optimizer.state_dict(),
                "epoch": self.iteration // self.steps_per_epoch + 1, "iteration": self.iteration,
                "best_performance": self.best, "best_iteration": self.best_iteration,
                "scaler": self.scaler.state_dict(), "history": self.history,
                "loss_window": windows, "train_seconds": self.train_seconds(),
                "args": recorded_settings(self.args), "data_spec": self.data_spec}

    def save(self, name: str) -> None:
        """Rank 0 writes `name` atomically; refuses non-finite weights so a diverged run never replaces
        the last good checkpoint."""
        windows = self.dist.gather_rows([self.cpu_window()]) if self.dist.enabled else None  # a collective
        if not self.dist.is_main:
            return
        bad = [k for k, v in self.model.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise RunError(f"the weights are not finite at iteration {self.iteration} ({len(bad)} tensors, e.g. "
                           f"{bad[0]}); {name} not written, the last good checkpoint is kept in {self.run_dir}. "
                           f"Try a lower --lr or --amp none.")
        path = self.run_dir / name
        kept = f"the previous {name} is intact" if path.is_file() else f"no earlier {name} was written"
        try:
            save_checkpoint(path, self.state(windows))
        except OSError as e:
            raise RunError(f"cannot write checkpoint {path} at iteration {self.iteration}: {e}; {kept}") from e

    def train_seconds(self) -> float:
        """Wall time of training so far, over every segment of a resumed run."""
        return self.seconds_before + time.time() - self._t0

    def cpu_window(self) -> list:
        return [{k: v.detach().float().cpu() for k, v in w.items()} for w in self.window]

    def all_ranks(self, values: torch.Tensor) -> torch.Tensor:
        """Sum of a small CPU tensor over ranks (identity for one process)."""
        if self.cpu_group is None:
            return values
        import torch.distributed as dist
        values = values.clone()
        dist.all_reduce(values, group=self.cpu_group)
        return values

    def load_state(self, restored) -> None:
        """Continue from a checkpoint (an engine.restore.Restored): weights, optimizer, scaler, iteration, best,
        history, loss window."""
        ckpt, path = restored.ckpt, restored.path
        restore.load_restored_weights(self.model, restored)
        if not ckpt.get("opt"):
            raise RunError(f"{path} holds no optimizer state ('opt'): an exact resume needs it (a fresh optimizer "
                           f"would silently change the run). Start a new run instead")
        try:
            self.optimizer.load_state_dict(ckpt["opt"])
            if ckpt.get("scaler"):
                self.scaler.load_state_dict(ckpt["scaler"])
        except (KeyError, ValueError) as e:
            raise RunError(f"{path}: its optimizer state does not fit --opt {self.args.opt} "
                           f"({type(e).__name__}: {e}); resume with the run's own settings") from None
        self.iteration = int(ckpt.get("iteration", 0))
        self.best = float(ckpt.get("best_performance", -math.inf))
        self.best_iteration = int(ckpt.get("best_iteration", 0))
        self.history = list(ckpt.get("history", []))
        self.seconds_before = float(ckpt.get("train_seconds") or 0.0)
        windows = ckpt.get("loss_window") or []
        own = windows[self.dist.rank] if len(windows) > self.dist.rank else []
        self.window = [{k: v.to(self.device) for k, v in w.items()} for w in own]
        self.log.info(f"resumed from {path} at iteration {self.iteration}")

    # ---------------------------------------------------------------- one step
    def train_step(self, images: torch.Tensor, targets: torch.Tensor) -> dict:
        args = self.args
        if args.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(self.device, args.amp):
            if args.method in MULTI_LEVEL_METHODS:
                propagate = args.cons_mode == "prop" and args.cons_weight > 0 and args.num_levels > 1
                outputs = self.net(images, propagate=propagate)
                masks = [targets[:, i:i + 1] for i in range(args.num_levels)]
                partial = args.method == "sparse_sup" or getattr(args, "ignore_below", None) is not None
                loss, logs = gaze_sup_loss(outputs, masks, args.cons_weight, args.cons_mode, partial)
            else:
                loss, logs = full_sup_loss(self.net(images), targets)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return logs

    # ---------------------------------------------------------------- evaluation
    def evaluate(self, data: TestData, save_pred: Path | None = None) -> tuple:
        # HD95 (a CPU distance transform per image) only at the last iteration: it is reported, not selected on
        final = self.iteration >= self.args.max_ite
        return evaluate(self.model, data, self.args.amp, save_pred, gather=self.dist.gather_rows, with_hd95=final)

    def after_evaluation(self) -> tuple:
        metrics, rows = self.evaluate(self.test_data)
        entry = {"iteration": self.iteration, "test": metrics}
        select = metrics
        if self.val_data is not None:
            select, _ = self.evaluate(self.val_data)
            entry["val"] = select
        if self.history and self.history[-1].get("iteration") == self.iteration:
            self.history[-1] = entry  # a finished run resumed at max_ite: evaluated again, recorded once
        else:
            self.history.append(entry)
        improved = select[self.main_metric] > self.best
        if improved:
            self.best, self.best_iteration = select[self.main_metric], self.iteration
        self.log.info(f"ite {self.iteration} | test " + " ".join(
            f"{k} {v:.4f}" for k, v in metrics.items() if k != "num_images")
            + (f" | val {self.main_metric} {select[self.main_metric]:.4f}" if self.val_data else "")
            + f" | best {self.main_metric} {self.best:.4f} @ {self.best_iteration}")
        if self.writer is not None:
            for k, v in metrics.items():
                self.writer.add_scalar(f"test/{k}", v, self.iteration)
            if self.val_data is not None:
                for k, v in select.items():
                    self.writer.add_scalar(f"val/{k}", v, self.iteration)
        self.save("model_latest.pth")
        if improved:
            self.save("model_best.pth")
        if self.writer is not None:
            log_images(self.writer, self.model, self.iteration, self.test_data, *self.train_preview(4),
                       gaze_sup=self.args.method in MULTI_LEVEL_METHODS)
        return metrics, rows

    def train_preview(self, count: int) -> tuple:
        """The first `count` training images and targets (unflipped): a slice of the preloaded tensors,
        else decoded once and kept."""
        if self._preview is None:
            if self.batches.tensors is not None:
                self._preview = tuple(t[:count] for t in self.batches.tensors)
            else:
                samples = [self.batches.dataset[i] for i in range(min(count, len(self.batches.dataset)))]
                self._preview = tuple(torch.stack([s[k] for s in samples]).to(self.device) for k in ("image", "target"))
        return self._preview

    # ---------------------------------------------------------------- the loop
    def fit(self) -> dict:
        """Train to --max_ite (or until SIGINT/SIGTERM: a resumable checkpoint) and write metrics.json."""
        self.log.info(f"{len(self.batches.dataset)} training images, {self.test_data.total} test images, "
                      f"{self.steps_per_epoch} steps per epoch, {self.total_epoch} epochs, device {self.device}")
        if self.dist.is_main:  # said once, at start (everything the command checks has passed)
            if self.device.type == "cpu" and str(self.args.device).strip() != "cpu":
                self.log.warning("warning: no GPU visible: training on the CPU (--device cpu says so and "
                                 "silences this)")
            warning = schedule_warning(self.args, self.steps_per_epoch)
            if warning:
                self.log.warning(warning)
        self._t0 = time.time()
        self._eta_clock = None  # (time, iteration) after the first step; the ETA is checked once from it
        bar = self.progress_bar()
        try:
            with StopFlag() as stop:
                stopped = self.train_epochs(stop, bar)
        finally:
            if bar is not None:
                bar.close()
        if stopped:
            return self.report_stop(stopped)
        if self.final is None:  # resumed at max_ite: evaluate once more
            self.final = self.after_evaluation()
        return self.finish(self.final, self.train_seconds())

    def progress_bar(self):
        if not self.dist.is_main or self.args.quiet:
            return None
        from tqdm import tqdm
        return tqdm(total=self.args.max_ite, initial=self.iteration, dynamic_ncols=True, desc="train")

    def train_epochs(self, stop: "StopFlag", bar) -> str | None:
        """The epochs from the current iteration on; returns the stop request's name, or None at max_ite."""
        spe, args = self.steps_per_epoch, self.args
        start_epoch, start_step = self.iteration // spe + 1, self.iteration % spe
        for epoch in range(start_epoch, self.total_epoch + 1):
            lr = lr_at_epoch(args, epoch, self.total_epoch)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            skip = start_step if epoch == start_epoch else 0
            for it, images, targets in self.batches.epoch(epoch, (epoch - 1) * spe + 1, skip):
                if it > args.max_ite:
                    break
                self.window.append(self.train_step(images, targets))
                self.iteration = it
                if bar is not None:
                    bar.update(1)
                stop_now = self.stop_requested(stop.signal)
                self.after_step(lr, stop_now, bar)
                if stop_now:
                    self.save("model_latest.pth")
                    return stop.signal or "stop request on another rank"
            if self.iteration >= args.max_ite:
                break
        return None

    def after_step(self, lr: float, stop_now: bool, bar) -> None:
        """What is due at this iteration: loss check, losses.csv row, evaluation, model_ite<N>.pth."""
        it, args = self.iteration, self.args
        self.check_eta()
        last = it == args.max_ite
        log_due, eval_due, save_due = it % args.log_step == 0 or last, it % args.val_step == 0 or last, \
            it % args.save_step == 0
        if log_due or eval_due or save_due or stop_now:  # never save weights trained on a non-finite loss
            self.check_finite(self.window)
        if log_due:
            self.log_window(self.window, lr)
            if bar is not None:
                bar.set_postfix(loss=f"{float(self.window[-1]['loss']):.4f}", lr=f"{lr:.2e}")
            self.window = []
        if eval_due:
            self.final = self.after_evaluation()
        if save_due:
            self.save(f"model_ite{it}.pth")

    def check_eta(self) -> None:
        """Warn once, a few steps in, when the run would take over a day at this speed."""
        clock = getattr(self, "_eta_clock", None)
        if clock is None:
            self._eta_clock = (time.perf_counter(), self.iteration)
        elif clock and self.iteration - clock[1] == ETA_SAMPLE_STEPS:
            self._eta_clock = False  # checked
            per_it = (time.perf_counter() - clock[0]) / ETA_SAMPLE_STEPS
            warning = eta_warning(self.args.max_ite - self.iteration, per_it, self.device)
            if warning and self.dist.is_main:
                self.log.warning(warning)

    def report_stop(self, signal_name: str) -> dict:
        self.log.info(f"{signal_name}: saved a resumable checkpoint at iteration {self.iteration} to {self.run_dir}"
                      f"/model_latest.pth; resume with: python run.py --resume --ckpt_path {self.run_dir}")
        return {"interrupted": True, "iteration": self.iteration}

    def stop_requested(self, signal_name: str | None) -> bool:
        """Whether any rank got SIGINT/SIGTERM: ranks decide together, or one would wait forever for the others."""
        if self.cpu_group is None:
            return signal_name is not None
        return bool(self.all_ranks(torch.tensor([int(signal_name is not None)])).item())

    def check_finite(self, window: list) -> None:
        """Stop on a NaN/inf loss before anything is saved, so the last good checkpoint stays the latest.
        Checked on the logging window (one GPU sync per check, not per step) and before every save."""
        if not window:
            return
        losses = self.all_ranks(torch.stack([w["loss"] for w in window]).float().cpu()) / self.dist.world_size
        bad = (~torch.isfinite(losses)).nonzero()
        if len(bad):
            first = self.iteration - len(window) + 1 + int(bad[0])
            raise RunError(f"the loss is {losses[int(bad[0])].item()} at iteration {first}; stopping. The last good "
                           f"checkpoint is kept in {self.run_dir} (model_latest.pth, if one was saved). "
                           f"Try a lower --lr or --amp none.")

    def log_window(self, window: list, lr: float) -> None:
        keys = list(window[-1])  # means over the window and over ranks (the global batch)
        means = torch.stack([torch.stack([w[k] for w in window]).float().mean() for k in keys]).cpu()
        means = dict(zip(keys, (self.all_ranks(means) / self.dist.world_size).tolist()))
        now = time.perf_counter()
        last, self._log_clock = self._log_clock, (now, self.iteration)
        speed = f"{1000 * (now - last[0]) / (self.iteration - last[1]):.1f} ms/it | " if last else ""
        self.log.info(f"ite {self.iteration}/{self.args.max_ite} | {speed}lr {lr:.3e} | "
                      + " | ".join(f"{k} {v:.6f}" for k, v in means.items()))
        if self.writer is not None:
            for k, v in means.items():
                self.writer.add_scalar(f"train/{k}", v, self.iteration)
            self.writer.add_scalar("train/lr", lr, self.iteration)
        if self.dist.is_main:
            self.append_losses(lr, means)

    def append_losses(self, lr: float, means: dict) -> None:
        """One losses.csv row; a failing write (full disk...) warns once and training goes on."""
        if self._losses_failed:
            return
        path = self.run_dir / "losses.csv"
        try:
            new = not path.exists()
            with open(path, "a", newline="") as f:
                w = csv.writer(f)
                if new:
                    w.writerow(["iteration", "lr"] + list(means))
                w.writerow([self.iteration, f"{lr:.8e}"] + [f"{v:.8e}" for v in means.values()])
        except OSError as e:
            self._losses_failed = True
            self.log.warning(f"warning: cannot write {path} ({e}); losses are no longer recorded, training goes on")

    def finish(self, final: tuple, seconds: float) -> dict:
        metrics, rows = final
        best_test = next((h["test"] for h in self.history if h["iteration"] == self.best_iteration), None)
        summary = {"final_iteration": self.iteration, "max_ite": self.args.max_ite, "status": "finished",
                   "final": metrics,
                   "best": {"iteration": self.best_iteration, "selected_on": "val" if self.val_data else "test",
                            self.main_metric: self.best, "test": best_test},
                   "history": self.history, "train_seconds": seconds, "device": device_name(self.device)}
        if self.dist.enabled:  # DDP keeps ranks in sync; record the proof (and warn if it ever fails)
            summary["weights_sha256_per_rank"] = self.dist.gather_rows([weights_digest(self.model)])
            if len(set(summary["weights_sha256_per_rank"])) > 1:
                self.log.warning("the ranks' weights differ at the end of training (see metrics.json)")
        if self.args.save_pred and self.dist.is_main:  # only rank 0 writes: it predicts the whole split
            data = self.test_data if not self.dist.enabled else TestData(test_dataset(self.args), self.device,
                                                                         self.args.num_worker)
            evaluate(self.model, data, self.args.amp, self.run_dir / "predictions", with_hd95=False)
        if self.dist.is_main:
            write_json(self.run_dir / "metrics.json", summary)
            write_rows_csv(self.run_dir / "per_image_metrics.csv", rows)
        self.log.info("final-iteration test metrics:\n" + metrics_table(metrics, self.args.num_levels
                                                                          if self.args.method in MULTI_LEVEL_METHODS
                                                                          else 0))
        return summary


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of the state dict (names and raw tensor bytes, in order): equal digests = bit-identical weights."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def checkpoint_bytes(model: torch.nn.Module, opt: str) -> int:
    """The expected size of one checkpoint: the weights plus the optimizer's state (Adam keeps two moments per
    parameter, SGD one momentum buffer)."""
    weights = sum(v.numel() * v.element_size() for v in model.state_dict().values())
    return weights * (1 + (2 if opt == "adam" else 1))
