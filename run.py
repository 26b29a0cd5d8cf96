"""GazeSup command line: train, evaluate (--test), resume, predict, or run the synthetic demo (--demo).

    python run.py -m gaze_sup --data kvasir --root ROOT --exp_path EXP ...   # train (the paper's flags)
    python run.py --test --ckpt_path RUN [--root ROOT]                       # evaluate a run's model_best.pth
    python run.py --resume --ckpt_path RUN [--max_ite N]                     # continue a run in its folder
    python run.py predict --ckpt_path RUN --input DIR --out DIR              # masks for new images
    python run.py sweep --presets kvasir_* --seeds 0,1,2 --root ROOT --exp_path EXP   # presets x seeds
    python run.py sweep ... --launcher slurm [--slurm_partition P ...]       # the same as a Slurm job array
    python run.py summarize EXP                                              # mean ± std table and curves
    python run.py --demo                                                     # synthetic end-to-end demo

Data preparation and gaze maps have their own commands: `python -m prepare` and `python -m gaze`.
A user error (bad flag, file, setting) ends with `error: <one line>` and exit status 2, and a command that
fails before training starts leaves no run folder behind. This file only dispatches: train/--test/--resume
are engine/commands.py, predict engine/predict.py, sweep and summarize experiments/.
"""
import os
import sys

from common.errors import INTERRUPTED_EXIT, UserError, one_line, report_user_error


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
        from experiments.sweep import main as sweep_main
        return sweep_main(argv[1:])
    if argv[:1] == ["summarize"]:
        from experiments.summarize import main as summarize_main
        return summarize_main(argv[1:])
    from engine.commands import run
    from parse_args import parse_with_explicit

    args, explicit = parse_with_explicit(argv)
    if args.demo:
        from demo import prepare_demo
        prepare_demo(args)
    return run(args, explicit, int(os.environ.get("LOCAL_RANK", "0")))


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
