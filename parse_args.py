"""Command-line flags. Names and defaults are the paper's, so its scripts run unchanged; a YAML file given
with --config (keys = flag names) sets defaults that explicit flags still override.

Flags from the command line and keys from the YAML file go through one validation: the same types,
choices and ranges. Every problem is a `FlagError` (a `UserError`: `error: ...`, exit status 2) naming the
flag or the file and key, the value and what was expected, raised before anything is written.
"""
import argparse
import os
from pathlib import Path
from typing import Any

import yaml

from common.errors import UserError

# keys that say what to do once, not what a run is: never recorded as settings, refused in a --config file
ONE_SHOT = ("config", "resume", "test", "ckpt_path", "demo")
# flags that cannot change a run's results (where and how it runs, logs and is written, what it is called):
# left out of a run's identity (common.identity), which the sweep and summarize compare
RESULT_NEUTRAL = ONE_SHOT + ("seed", "num_worker", "device", "log_step", "save_step", "quiet", "exp_path",
                             "run_name", "root", "preload", "save_pred", "propagation", "compile",
                             "channels_last", "fp16", "model")
METHOD_ALIASES = {"gaze": "gaze_sup", "gaze_sup": "gaze_sup", "full": "full_sup", "full_sup": "full_sup"}
USAGE = """
  run.py [--config YAML] [flags]                      train (the paper's flags; see below)
  run.py --test --ckpt_path RUN [--root ROOT]         evaluate a run's model_best.pth (or a .pth) on its test split
  run.py --resume --ckpt_path RUN [--max_ite N]       continue an interrupted run in its own folder
  run.py predict --ckpt_path RUN --input IMAGES --out DIR   masks for new images (run.py predict --help)
  run.py sweep --presets NAMES --seeds 0,1,2 --root ROOT --exp_path EXP   presets x seeds (run.py sweep --help)
  run.py summarize EXP                                mean ± std over seeds, summary.md/csv, curves.png
  run.py --demo                                       synthetic data with simulated gaze, trained end to end"""


class FlagError(UserError):
    """A flag or --config key with a bad value; the message names it (`key`: the flag's name, when known)."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _int_list(text: str) -> list[int]:
    return [int(v) for v in str(text).replace(" ", "").strip("[]()").split(",") if v]


def _float_list(text: str) -> list[float]:
    return [float(v) for v in str(text).replace(" ", "").strip("[]()").split(",") if v]


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one-line `FlagError`s instead of usage + exit."""

    def error(self, message: str):
        raise FlagError(message)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each default printed once: not for help that already states it, nor for None / off switches."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="run.py", usage=USAGE,
        description="GazeSup: train and evaluate gaze-supervised segmentation (Zhong et al., MICCAI 2024).",
        formatter_class=_HelpFormatter)
    g = p.add_argument_group("run")
    g.add_argument("--config", default=None, help="YAML file whose keys are flag names; explicit flags override it")
    g.add_argument("-m", "--method", default="gaze_sup", choices=sorted(METHOD_ALIASES),
                   help="gaze_sup: train on gaze pseudo-masks; full_sup: train on ground-truth masks "
                        "(gaze, full: aliases)")
    g.add_argument("--data", default="kvasir", help="dataset: a built-in spec (kvasir, prostate) or a spec YAML file")
    g.add_argument("--root", default=None, help="prepared dataset folder (images/, masks/, gaze/, train.txt, test.txt)")
    g.add_argument("--exp_path", default="exp", help="runs go to EXP/<seed>/<data>/<run_id>_<timestamp>/")
    g.add_argument("--ckpt_path", default=None, help="a run folder or a .pth: --test and predict use its "
                   "model_best.pth, --resume its model_latest.pth")
    g.add_argument("--resume", action="store_true", help="continue the run of --ckpt_path in its folder; its "
                   "config.yaml gives every setting (only --max_ite may be raised, plus --root/--device/--num_worker)")
    g.add_argument("--test", action="store_true", help="evaluate --ckpt_path on its run's test split with its run's "
                   "settings (override only --root, --device, --num_worker, --save_pred, --amp, --test_split)")
    g.add_argument("--save_pred", action="store_true",
                   help="write test predictions (PNG) of the ensemble and each level")
    g.add_argument("--seed", type=int, default=0, help="random seed")
    g.add_argument("--device", default="0", help="CUDA device index; CPU is used when no GPU is visible")
    g.add_argument("--num_worker", type=int, default=min(4, _cpu_count()),
                   help="data loading workers (default: 4, at most the CPUs available)")
    g.add_argument("--demo", action="store_true", help="generate a small synthetic dataset with simulated gaze and "
                   "train a narrow model on it (CPU, a few minutes)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.add_argument("--run_name", default=None, help="run folder name prefix (default: method and levels)")

    g = p.add_argument_group("data")
    g.add_argument("--spatial_size", type=int, default=384, help="network input side; images are resized to it")
    g.add_argument("--in_channels", type=int, default=3, help="image channels (kvasir 3, prostate 1)")
    g.add_argument("--data_size_rate", type=float, default=1.0, help="use the first int(n*rate) training ids")
    g.add_argument("--train_split", default="train", help="training split file (ROOT/<name>.txt)")
    g.add_argument("--test_split", default="test", help="test split file (ROOT/<name>.txt)")
    g.add_argument("--gaze_dir", default="crf_compat1",
                   help="gaze-map folder under ROOT/gaze/ (heatmap for a dataset spec with crf: null)")
    g.add_argument("--thresholds", type=_float_list, default=None,
                   help="gaze-map threshold per level, e.g. 0.5,0.3 (default: the dataset spec's table)")
    g.add_argument("--val_fraction", type=float, default=0.0,
                   help="hold out this seeded fraction of the training ids (with their GT masks) to select "
                        "model_best; 0 selects on the test split as the paper does")
    g.add_argument("--preload", default="auto", choices=["auto", "yes", "no"],
                   help="decode and resize the training set once and keep it as tensors (auto: if it fits)")

    g = p.add_argument_group("model")
    g.add_argument("--model", default="unet", choices=["unet"],
                   help="accepted so the paper's scripts run unchanged, and ignored (the model is the paper's "
                        "MONAI BasicUNet)")
    g.add_argument("--num_levels", type=int, default=2, help="number of gaze levels (networks)")
    g.add_argument("--features", type=_int_list, default=[64, 128, 256, 512, 1024, 128],
                   help="U-Net widths (6 values); narrow ones for CPU")
    g.add_argument("--feat_dim", type=int, default=128, help="feature-map channels (U-Net output)")
    g.add_argument("--propagation", default="torch", choices=["torch", "triton"],
                   help="feature-propagation implementation (triton: CUDA only)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--opt", default="adam", choices=["sgd", "adam"], help="sgd: momentum 0.99, Nesterov")
    g.add_argument("--lr", type=float, default=4e-4, help="learning rate")
    g.add_argument("--lr_min", type=float, default=1e-6, help="final learning rate of the cosine schedule")
    g.add_argument("--lr_scheduler", default="none", choices=["none", "cos"], help="per-epoch learning-rate schedule")
    g.add_argument("--weight_decay", type=float, default=4e-4, help="weight decay")
    g.add_argument("--max_ite", type=int, default=15000, help="training iterations")
    g.add_argument("--warmup_ite", type=int, default=0,
                   help="warm-up length, compared with the epoch as in the paper's code")
    g.add_argument("-bs", "--batch_size", type=int, default=8, help="batch size (per process)")
    g.add_argument("--cons_weight", type=float, default=3.0, help="weight of the cross-level consistency loss")
    g.add_argument("--cons_mode", default="prop", choices=["pure", "prop"],
                   help="consistency on propagated or plain predictions")
    g.add_argument("--fp16", action="store_true", help="float16 autocast with a gradient scaler (same as --amp fp16)")
    g.add_argument("--amp", default="none", choices=["none", "fp16", "bf16"], help="autocast precision")
    g.add_argument("--channels_last", action="store_true", help="channels_last memory format (faster convs on GPU)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (static shapes)")
    g.add_argument("--deterministic", action="store_true", help="deterministic algorithms (bit-identical CPU reruns)")

    g = p.add_argument_group("logging")
    g.add_argument("--log_step", type=int, default=100, help="log every N iterations")
    g.add_argument("--val_step", type=int, default=1000, help="evaluate every N iterations (and after the last)")
    g.add_argument("--save_step", type=int, default=5000, help="save model_ite<N>.pth every N iterations")
    return p


# ---------------------------------------------------------------- YAML
def _yaml_value(action: argparse.Action, value: Any, where: str) -> Any:
    """A YAML value converted to what the flag would give, or a FlagError naming `where` (file: key)."""
    def bad(expected: str):
        return FlagError(f"{where}: {value!r} is not valid; expected {expected}")

    if value is None:
        if action.default is None:
            return None
        raise bad("a value")
    if isinstance(action, argparse._StoreTrueAction):
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if action.type in (_int_list, _float_list):
        kind = int if action.type is _int_list else float
        items = value if isinstance(value, list) else None
        if isinstance(value, str):
            try:
                items = action.type(value)
            except ValueError:
                items = None
        if items is None or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in items) \
                or (kind is int and not all(float(v).is_integer() for v in items)):
            raise bad("a list of integers, e.g. [8, 8, 16, 16, 32, 8]" if kind is int
                      else "a list of numbers, e.g. [0.5, 0.3]")
        value = [kind(v) for v in items]
    elif action.type in (int, float):
        if isinstance(value, (bool, list, dict)):
            raise bad("an integer" if action.type is int else "a number")
        if isinstance(value, str) or (action.type is float and isinstance(value, int)):
            try:  # YAML reads 1e-2 (no dot) as a string
                value = action.type(value)
            except ValueError:
                raise bad("an integer" if action.type is int else "a number") from None
        if action.type is int and not isinstance(value, int):
            raise bad("an integer")
    else:
        if isinstance(value, (list, dict, bool)):
            raise bad("a string")
        value = str(value)
    if action.choices is not None and value not in action.choices:
        raise bad(f"one of {', '.join(map(str, action.choices))}")
    return value


def load_config(path: str, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """The flags of a --config YAML file, validated key by key."""
    file = Path(path)
    if file.is_dir():
        raise FlagError(f"--config {path} is a folder; expected a YAML file (e.g. RUN/config.yaml)")
    try:
        raw = yaml.safe_load(file.read_text())
    except FileNotFoundError:
        raise FlagError(f"--config {path}: file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise FlagError(f"--config {path}: cannot read it ({e})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise FlagError(f"--config {path}: invalid YAML{where}: {problem}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise FlagError(f"--config {path}: expected a mapping of flag names to values, got {type(raw).__name__}")
    actions = {a.dest: a for a in parser._actions if a.dest != "help"}
    unknown = sorted(str(k) for k in raw if k not in actions)
    if unknown:
        raise FlagError(f"--config {path}: unknown key(s) {unknown}; keys are flag names such as lr, max_ite")
    acting = [f"{k}: {raw[k]}" for k in ONE_SHOT if k != "config" and raw.get(k) not in (None, False)]
    if acting:  # e.g. a resumed run's config.yaml: reusing it must start a new run, never resume the old one
        raise FlagError(f"--config {path}: {', '.join(acting)} is a command, not a setting; remove it from the file "
                        f"and pass the command on the command line (e.g. --resume --ckpt_path RUN)")
    return {k: _yaml_value(actions[k], v, f"--config {path}: key {k}") for k, v in raw.items() if k not in ONE_SHOT}


# ---------------------------------------------------------------- ranges
# flag -> (lowest, lowest allowed?, highest, highest allowed?); None: unbounded
RANGES: dict[str, tuple[float | None, bool, float | None, bool]] = {
    "batch_size": (1, True, None, False), "max_ite": (1, True, None, False), "log_step": (1, True, None, False),
    "val_step": (1, True, None, False), "save_step": (1, True, None, False), "num_levels": (1, True, None, False),
    "num_worker": (0, True, None, False), "spatial_size": (16, True, None, False),
    "in_channels": (1, True, None, False), "feat_dim": (1, True, None, False), "warmup_ite": (0, True, None, False),
    "data_size_rate": (0, False, 1, True), "val_fraction": (0, True, 1, False),
    "lr": (0, False, None, False), "lr_min": (0, True, None, False), "weight_decay": (0, True, None, False),
    "cons_weight": (0, True, None, False),
}


def _range_text(lo, lo_ok, hi, hi_ok) -> str:
    if hi is None:
        return f"{'>=' if lo_ok else '>'} {lo}"
    return f"in {'[' if lo_ok else '('}{lo}, {hi}{']' if hi_ok else ')'}"


def check_args(args: argparse.Namespace) -> None:
    """Ranges and cross-flag rules, for flags and YAML keys alike (FlagError naming the flag)."""
    from common.dataspec import load_spec

    for name, (lo, lo_ok, hi, hi_ok) in RANGES.items():
        v = getattr(args, name)
        below = v < lo if lo_ok else v <= lo
        above = hi is not None and (v > hi if hi_ok else v >= hi)
        if below or above:
            raise FlagError(f"--{name} {v}: expected a value {_range_text(lo, lo_ok, hi, hi_ok)}", name)
    name = args.run_name
    if name is not None and (not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name):
        raise FlagError(f"--run_name {name!r}: expected one folder name (no '/', no '..'); the run goes to "
                        "EXP/<seed>/<data>/<run_name>_<timestamp>", "run_name")
    if len(args.features) != 6 or min(args.features) < 1:
        raise FlagError(f"--features {args.features}: expected 6 positive widths, e.g. 8,8,16,16,32,8", "features")
    spec = load_spec(args.data)  # an unknown name or a bad spec file fails here, naming it
    if args.method == "gaze_sup":
        if args.thresholds is not None:
            if len(args.thresholds) != args.num_levels or not all(0 < t < 1 for t in args.thresholds):
                raise FlagError(f"--thresholds {args.thresholds}: expected {args.num_levels} value(s) (one per "
                                f"level, --num_levels {args.num_levels}), each strictly between 0 and 1", "thresholds")
        else:
            spec.level_thresholds(args.num_levels)
    if args.test and args.resume:
        raise FlagError("--test and --resume exclude each other")
    if (args.test or args.resume) and not args.ckpt_path:
        raise FlagError(f"--{'test' if args.test else 'resume'} needs --ckpt_path (a run folder or a .pth file)")


# ---------------------------------------------------------------- parsing
def _normalize(values: dict[str, Any]) -> dict[str, Any]:
    """Aliases resolved (-m gaze -> gaze_sup) and --fp16 folded into --amp."""
    if "method" in values:
        values["method"] = METHOD_ALIASES[values["method"]]
    if values.get("fp16"):
        values["amp"] = "fp16"
    return values


def parse_with_explicit(argv: list[str] | None = None) -> tuple[argparse.Namespace, dict[str, Any]]:
    """(resolved flags, the ones the user set: --config keys overridden by command-line flags)."""
    parser = build_parser()
    pre, _ = parser.parse_known_args(argv)
    config = load_config(pre.config, parser) if pre.config else {}
    parser.set_defaults(**config)
    args = parser.parse_args(argv)
    _normalize(vars(args))
    quiet = build_parser()
    for action in quiet._actions:  # a parse with no defaults: only what the command line sets
        action.default = argparse.SUPPRESS
    given = vars(quiet.parse_args(argv))
    try:
        check_args(args)
    except FlagError as e:
        if e.key in config and e.key not in given:  # the value came from the file: name it
            raise FlagError(f"--config {pre.config}: key {e.key}: {e}", e.key) from None
        raise
    explicit = _normalize({**config, **given})
    explicit.pop("config", None)
    if "gaze_dir" not in explicit:  # a dataset without a CRF step trains on its heatmaps (python -m gaze)
        from common.dataspec import load_spec
        if load_spec(args.data).crf is None:
            args.gaze_dir = "heatmap"
    return args, explicit


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return parse_with_explicit(argv)[0]
