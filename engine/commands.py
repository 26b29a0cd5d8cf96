"""The train / --test / --resume commands of run.py: a recorded run restored, a run folder opened, the
Trainer or the evaluation run, the exit status returned. run.py only dispatches to here."""
from argparse import Namespace
from pathlib import Path

from common.errors import INTERRUPTED_EXIT, one_line
from datasets.segmentation import level_thresholds
from engine.device import pick_device
from engine.distributed import cleanup_distributed, init_distributed
from engine.evaluate import TestData, evaluate
from engine.restore import restore, restored_model
from engine.run_folder import (
    LOG_SLACK_BYTES,
    RunError,
    attach_log_file,
    check_exp_path,
    check_resume_exp_path,
    create_run_dir,
    expected_run_bytes,
    lock_run,
    log_file_only,
    metrics_table,
    open_tensorboard,
    release_locks,
    save_config,
    setup_logger,
    write_json,
    write_rows_csv,
    write_text_atomic,
)
from engine.train import Trainer, checkpoint_bytes, make_model, seed_everything, test_dataset
from models.checkpoint import load_checkpoint
from parse_args import ONE_SHOT, FlagError, check_args, default_settings, flags_with


def restore_run(args: Namespace, explicit: dict, command: str):
    """(Restored, the settings of this command): the run's record, the safe flags, this command's own flags."""
    restored = restore(args.ckpt_path, explicit, command, default_settings())
    config = dict(restored.config)
    for key in flags_with(ONE_SHOT) + ("quiet",):  # this command's own
        config[key] = getattr(args, key)
    if command == "test" or restored.run_dir is None:  # a new folder: where this command says
        config["exp_path"], config["run_name"] = args.exp_path, args.run_name
    settings = Namespace(**config)
    try:
        check_args(settings)
    except FlagError as e:
        raise RunError(f"{restored.path}: the settings it records are not usable: {e}") from None
    if not settings.root or not Path(settings.root).is_dir():
        raise RunError(f"the run's dataset root {settings.root} (recorded for {restored.path}) is not a folder; "
                       "pass --root ROOT where the data is now")
    return restored, settings


def open_run_dir(args: Namespace, dist_ctx, log, kind: str = "", existing: Path | None = None) -> Path:
    """The run folder on every rank: `existing` (a resumed run) or a new one made by rank 0; then log.txt
    (with what was logged so far) and config.yaml."""
    run_dir = existing
    if run_dir is None and dist_ctx.is_main:
        run_dir = create_run_dir(args, kind)
    if dist_ctx.enabled:
        import torch.distributed as dist
        box = [run_dir]
        dist.broadcast_object_list(box, src=0)
        run_dir = box[0]
    if dist_ctx.is_main:
        attach_log_file(log, run_dir)
        save_config(args, run_dir)
    log.info(f"run folder: {run_dir}")
    return run_dir


def run_test(args: Namespace, explicit: dict, device, dist_ctx) -> int:
    """Evaluate a checkpoint with its run's settings; writes metrics.json and per_image_metrics.csv."""
    restored, args = restore_run(args, explicit, "test")
    run_dir = restored.run_dir.resolve() if restored.run_dir is not None else None
    if "exp_path" not in explicit and run_dir is not None and run_dir.parent.parent.name == str(args.seed):
        args.exp_path = str(run_dir.parents[2])  # RUN = EXP/<seed>/<data>/<run>: the evaluation goes beside it
    log = setup_logger(None, args.quiet, dist_ctx.rank)
    for note in restored.notes:
        log.info(f"overridden by the command line: {note}")
    model = restored_model(restored).to(device)
    data = TestData(test_dataset(args), device, args.num_worker)  # every rank evaluates the whole split
    check_exp_path(args.exp_path, LOG_SLACK_BYTES)
    run_dir = open_run_dir(args, dist_ctx, log, "_test")
    save_pred = run_dir / "predictions" if args.save_pred and dist_ctx.is_main else None
    metrics, rows = evaluate(model, data, args.amp, save_pred)
    if not dist_ctx.is_main:
        return 0
    write_json(run_dir / "metrics.json", {"checkpoint": str(restored.path), "test": metrics,
                                          "checkpoint_iteration": restored.ckpt.get("iteration")})
    write_rows_csv(run_dir / "per_image_metrics.csv", rows)
    levels = args.num_levels if args.method != "full_sup" else 0
    log.info(f"test metrics of {restored.path} ({args.spatial_size} px):\n" + metrics_table(metrics, levels))
    return 0


def check_resume_point(restored, settings: Namespace) -> None:
    """Resuming in place must not go back in time: the checkpoint is the folder's latest, and --max_ite
    is not below its iteration."""
    iteration = int(restored.ckpt.get("iteration", 0))
    if settings.max_ite < iteration:
        raise RunError(f"--max_ite {settings.max_ite} is below the iteration of {restored.path} ({iteration})")
    latest = restored.run_dir / "model_latest.pth" if restored.run_dir else None
    if latest is not None and latest.is_file() and latest.resolve() != restored.path.resolve():
        later = int(load_checkpoint(latest).get("iteration", 0))
        if later > iteration:
            raise RunError(f"{restored.path} is at iteration {iteration} but its run continued to {later} "
                           f"({latest}); resuming it in place would overwrite that progress. Resume with "
                           f"--ckpt_path {restored.run_dir}, or copy the folder and resume the copy")


def trim_losses(run_dir: Path, iteration: int) -> None:
    """Drop losses.csv rows after `iteration` (written after the checkpoint; the resumed run rewrites them)."""
    path = run_dir / "losses.csv"
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    first = [row.split(",")[0] for row in lines[1:]]  # a row cut short by a crash is dropped as well
    keep = lines[:1] + [row for row, it in zip(lines[1:], first) if it.isdigit() and int(it) <= iteration]
    if len(keep) < len(lines):
        write_text_atomic(path, "\n".join(keep) + "\n")


def run_train(args: Namespace, explicit: dict, device, dist_ctx) -> int:
    """Train (or, with --resume, continue a run in its folder)."""
    restored = None
    if args.resume:
        restored, args = restore_run(args, explicit, "resume")
        if restored.run_dir is not None:
            check_resume_exp_path(restored.run_dir, explicit)
            if dist_ctx.is_main:  # before anything in the folder changes; held until the process ends
                lock_run(restored.run_dir)
        check_resume_point(restored, args)
    if args.method == "gaze_sup" and not args.thresholds:  # the run records the thresholds it uses, not null
        args.thresholds = level_thresholds(args.data, args.num_levels)
    if not args.root:
        raise FlagError("--root is required to train: the prepared dataset folder (images/, gaze/ or masks/, "
                        "train.txt, test.txt; see python -m prepare)", "root")
    log = setup_logger(None, args.quiet, dist_ctx.rank)
    for note in restored.notes if restored else []:
        log.info(f"changed at resume: {note}")
    seed_everything(args.seed, args.deterministic)
    model = make_model(args)  # from the seed, before any data is read (as the paper's code)
    existing = restored.run_dir if restored else None
    check_exp_path(existing or args.exp_path, expected_run_bytes(checkpoint_bytes(model, args.opt), args))
    trainer = Trainer(args, None, device, dist_ctx, log, model=model)
    if restored:
        trainer.load_state(restored)
    trainer.run_dir = open_run_dir(args, dist_ctx, log, existing=existing)
    if dist_ctx.is_main and existing is None:
        lock_run(trainer.run_dir)
    writer = None
    if dist_ctx.is_main:
        if existing:
            trim_losses(existing, trainer.iteration)
        # purge_step: TensorBoard drops the events of a previous attempt after the resumed iteration
        purge = trainer.iteration + 1 if existing else None
        writer = trainer.writer = open_tensorboard(trainer.run_dir, purge, log)
    try:
        summary = trainer.fit()
    except BaseException as e:  # the run's log.txt says how it ended (the console gets the line from run.cli)
        log_file_only(log, f"error: {one_line(e) or type(e).__name__}")
        raise
    finally:
        if writer is not None:
            writer.close()
    return INTERRUPTED_EXIT if summary.get("interrupted") else 0


def run(args: Namespace, explicit: dict, local_rank: int) -> int:
    """Train, resume or evaluate (`args.test`) on the device of --device, under torchrun if launched so."""
    device = pick_device(args.device, local_rank)
    dist_ctx = init_distributed(device)
    try:
        if args.test:
            return run_test(args, explicit, device, dist_ctx)
        return run_train(args, explicit, device, dist_ctx)
    finally:
        release_locks()
        cleanup_distributed()
