"""GazeSup command line: train, evaluate (--test), predict, or run the synthetic demo (--demo).

    python run.py -m gaze_sup --data kvasir --root ROOT --exp_path EXP ...   # train (the paper's flags)
    python run.py --test --ckpt_path CKPT --data kvasir --root ROOT ...      # evaluate a checkpoint
    python run.py predict --ckpt_path CKPT --input DIR --out DIR             # masks for new images
    python run.py --demo                                                     # synthetic end-to-end demo
"""
import sys

import torch

from datasets.io import DataError
from engine.run_folder import RunError
from models.checkpoint import CheckpointError


def pick_device(args, local_rank: int = 0) -> torch.device:
    """CUDA when a GPU is visible (--device picks it; torchrun's LOCAL_RANK under data parallelism), else CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    import os
    index = local_rank if int(os.environ.get("WORLD_SIZE", "1")) > 1 else int(str(args.device).split(",")[0])
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def model_args_from_checkpoint(args, ckpt: dict, path) -> None:
    """The model shape from the checkpoint, so --test needs no width flags: recorded by this project's
    checkpoints, else read off the state dict's names and shapes (the paper's checkpoints)."""
    from models.checkpoint import checkpoint_state_dict, infer_model_args

    saved = ckpt.get("args") if isinstance(ckpt.get("args"), dict) else infer_model_args(
        checkpoint_state_dict(ckpt, path))
    for key in ("method", "num_levels", "features", "feat_dim", "in_channels"):
        if key in saved:
            setattr(args, key, saved[key])


def run_test(args, device, log, run_dir, is_main: bool = True) -> dict:
    from engine.evaluate import TestData, evaluate
    from engine.run_folder import metrics_table, resolve_checkpoint, write_json, write_rows_csv
    from engine.train import make_model, test_dataset
    from models.checkpoint import checkpoint_state_dict, load_checkpoint, load_model_state

    path = resolve_checkpoint(args.ckpt_path)
    ckpt = load_checkpoint(path)
    model_args_from_checkpoint(args, ckpt, path)
    model = make_model(args).to(device)
    load_model_state(model, checkpoint_state_dict(ckpt, path), path)
    data = TestData(test_dataset(args), device, args.num_worker)
    metrics, rows = evaluate(model, data, args.amp, run_dir / "predictions" if args.save_pred and is_main else None)
    if not is_main:  # under torchrun every rank evaluates the whole split; rank 0 alone writes
        return metrics
    write_json(run_dir / "metrics.json", {"checkpoint": str(path), "test": metrics,
                                          "checkpoint_iteration": ckpt.get("iteration")})
    write_rows_csv(run_dir / "per_image_metrics.csv", rows)
    levels = args.num_levels if args.method == "gaze_sup" else 0
    log.info(f"test metrics of {path}:\n" + metrics_table(metrics, levels))
    return metrics


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["predict"]:
        from engine.predict import main as predict_main
        return predict_main(argv[1:])
    from engine.distributed import cleanup_distributed, init_distributed
    from engine.run_folder import create_run_dir, save_config, setup_logger
    from parse_args import parse_args

    args = parse_args(argv)
    if args.demo:
        from engine.demo import prepare_demo
        prepare_demo(args)
    import os
    device = pick_device(args, int(os.environ.get("LOCAL_RANK", "0")))
    dist_ctx = init_distributed(device)
    try:
        run_dir = create_run_dir(args, "_test" if args.test else "") if dist_ctx.is_main else None
        if dist_ctx.enabled:
            import torch.distributed as dist
            box = [run_dir]
            dist.broadcast_object_list(box, src=0)
            run_dir = box[0]
        log = setup_logger(run_dir, args.quiet, dist_ctx.rank)
        log.info(f"run folder: {run_dir}")
        if dist_ctx.is_main:
            save_config(args, run_dir)
        if args.test:
            run_test(args, device, log, run_dir, dist_ctx.is_main)
            return 0
        from engine.train import Trainer
        writer = None
        if dist_ctx.is_main:
            from torch.utils.tensorboard import SummaryWriter
            writer = SummaryWriter(str(run_dir))
        try:
            summary = Trainer(args, run_dir, device, dist_ctx, log, writer).fit()
        finally:
            if writer is not None:
                writer.close()
        return 130 if summary.get("interrupted") else 0
    finally:
        cleanup_distributed()


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (DataError, RunError, CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
