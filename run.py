"""GazeSup command line: train, evaluate (--test), resume, predict, or run the synthetic demo (--demo).

    python run.py -m gaze_sup --data kvasir --root ROOT --exp_path EXP ...   # train (the paper's flags)
    python run.py --test --ckpt_path RUN [--root ROOT]                       # evaluate a run's model_best.pth
    python run.py --resume --ckpt_path RUN [--max_ite N]                     # continue a run in its folder
    python run.py predict --ckpt_path RUN --input DIR --out DIR              # masks for new images
    python run.py sweep --presets kvasir_* --seeds 0,1,2 --root ROOT --exp_path EXP   # presets x seeds
    python run.py summarize EXP                                              # mean ± std table and curves
    python run.py --demo                                                     # synthetic end-to-end demo

A user error (bad flag, file, setting) ends with `error: <one line>` and exit status 2, and a command that
fails before training starts leaves no run folder behind.
"""
import os
import sys
from argparse import Namespace
from pathlib import Path

from common.errors import UserError, one_line, report_user_error

INTERRUPTED_EXIT = 130


def default_settings() -> dict:
    from parse_args import build_parser
    return vars(build_parser().parse_args([]))


def restore_run(args: Namespace, explicit: dict, command: str):
    """(Restored, the settings of this command): the run's record, the safe flags, this command's own flags."""
    from engine.restore import restore
    from engine.run_folder import RunError
    from parse_args import FlagError, check_args

    restored = restore(args.ckpt_path, explicit, command, default_settings())
    config = dict(restored.config)
    for key in ("config", "test", "resume", "ckpt_path", "quiet", "demo"):
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
    from engine.run_folder import attach_log_file, create_run_dir, save_config

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
    from engine.evaluate import TestData, evaluate
    from engine.restore import restored_model
    from engine.run_folder import (
        LOG_SLACK_BYTES,
        check_exp_path,
        metrics_table,
        setup_logger,
        write_json,
        write_rows_csv,
    )
    from engine.train import test_dataset

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
    levels = args.num_levels if args.method == "gaze_sup" else 0
    log.info(f"test metrics of {restored.path} ({args.spatial_size} px):\n" + metrics_table(metrics, levels))
    return 0


def check_resume_point(restored, settings: Namespace) -> None:
    """Resuming in place must not go back in time: the checkpoint is the folder's latest, and --max_ite
    is not below its iteration."""
    from engine.run_folder import RunError
    from models.checkpoint import load_checkpoint

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
    from engine.run_folder import write_text_atomic

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
    from engine.run_folder import SafeWriter, check_exp_path, expected_run_bytes, setup_logger
    from engine.train import Trainer, checkpoint_bytes, make_model, seed_everything

    restored = None
    if args.resume:
        restored, args = restore_run(args, explicit, "resume")
        check_resume_point(restored, args)
    if not args.root:
        from parse_args import FlagError
        raise FlagError("--root is required to train: the prepared dataset folder (images/, gaze/ or masks/, "
                        "train.txt, test.txt; see python -m datasets.prepare)", "root")
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
    writer = None
    if dist_ctx.is_main:
        from torch.utils.tensorboard import SummaryWriter
        if existing:
            trim_losses(existing, trainer.iteration)
        # purge_step: TensorBoard drops the events of a previous attempt after the resumed iteration
        purge = trainer.iteration + 1 if existing else None
        writer = trainer.writer = SafeWriter(SummaryWriter(str(trainer.run_dir), purge_step=purge), log)
    try:
        summary = trainer.fit()
    except BaseException as e:  # the run's log.txt says how it ended
        log.error(f"error: {one_line(e) or type(e).__name__}")
        raise
    finally:
        if writer is not None:
            writer.close()
    return INTERRUPTED_EXIT if summary.get("interrupted") else 0


def main(argv=None) -> int:
    """Run one command; user errors are raised as `UserError` (see `cli` for the exit status)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["predict"]:  # --model: the exported model on onnxruntime; --ckpt_path: torch
        from release.onnx_predict import dispatch
        return dispatch(argv[1:])
    if argv[:1] == ["export"]:
        from release.export import main as export_main
        return export_main(argv[1:])
    if argv[:1] == ["sweep"]:
        from engine.sweep import main as sweep_main
        return sweep_main(argv[1:])
    if argv[:1] == ["summarize"]:
        from engine.summarize import main as summarize_main
        return summarize_main(argv[1:])
    from engine.device import pick_device
    from engine.distributed import cleanup_distributed, init_distributed
    from parse_args import parse_with_explicit

    args, explicit = parse_with_explicit(argv)
    if args.demo:
        from demo import prepare_demo
        prepare_demo(args)
    device = pick_device(args.device, int(os.environ.get("LOCAL_RANK", "0")))
    dist_ctx = init_distributed(device)
    try:
        if args.test:
            return run_test(args, explicit, device, dist_ctx)
        return run_train(args, explicit, device, dist_ctx)
    finally:
        cleanup_distributed()


def cli(argv=None) -> int:
    """`main` with the exit statuses: 0 done, 2 user error (one line), 130 interrupted."""
    try:
        return main(argv)
    except UserError as e:
        return report_user_error(e)
    except KeyboardInterrupt as e:  # the second SIGINT/SIGTERM: stop now, without a traceback
        print(f"error: {one_line(e) or 'interrupted'}; the last checkpoint of the run is kept", file=sys.stderr)
        return INTERRUPTED_EXIT


if __name__ == "__main__":
    sys.exit(cli())
