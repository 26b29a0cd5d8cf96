"""Command-line flags. Names and defaults are the paper's, so its scripts run unchanged; a YAML file given
with --config (keys = flag names) sets defaults that explicit flags still override.

Flags from the command line and keys from the YAML file go through one validation: the same types,
choices and ranges. Every problem is a `FlagError` (a `UserError`: `error: ...`, exit status 2) naming the
flag or the file and key, the value and what was expected, raised before anything is written.
"""
import argparse
import copy
import os
from typing import Any

from common.errors import OneLineParser, UserError, command_name
from common.recipes import RecipeError, config_path, read_recipe

METHOD_ALIASES = {"gaze": "gaze_sup", "gaze_sup": "gaze_sup", "full": "full_sup", "full_sup": "full_sup",
                  "sparse": "sparse_sup", "sparse_sup": "sparse_sup"}
USAGE = """
  %(prog)s [--config YAML] [flags]                      train (the paper's flags; see below)
  %(prog)s --test --ckpt_path RUN [--root ROOT]         evaluate a run's model_best.pth (or a .pth) on its test split
  %(prog)s --resume --ckpt_path RUN [--max_ite N]       continue an interrupted run in its own folder
  %(prog)s predict --ckpt_path RUN --input IMAGES --out DIR   masks for new images (%(prog)s predict --help)
  %(prog)s sweep --presets NAMES --seeds 0,1,2 --root ROOT --exp_path EXP   presets x seeds (%(prog)s sweep --help)
  %(prog)s summarize EXP                                mean ± std over seeds, summary.md/csv, curves.png
  %(prog)s --demo                                       synthetic data with simulated gaze, trained end to end
  python -m prepare kvasir|nci-isbi ...               prepare a downloaded dataset (python -m prepare --help)
  python -m gaze --csv FIX.csv --root ROOT --data D   gaze maps from fixations (python -m gaze --help)
  (installed with `pip install -e .`: gazesup = run.py, gazesup-prepare, gazesup-gaze)"""


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


class _Parser(OneLineParser):
    """The shared parser (both flag spellings, typo suggestions, --version; common/errors.py) whose errors are
    `FlagError`s."""

    def error(self, message: str):
        raise FlagError(self.suggest(message))


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each default printed once: not for help that already states it, nor for None / off switches."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


# ---------------------------------------------------------------- roles
# Each flag is declared once, below, with its roles; every other table of flags is derived from them
# (engine/restore.py's precedence rule, predict's model flags, the sweep's owned flags, a run's identity).
SHAPE = "shape"                # the network's shape: read from a run's record (or a paper checkpoint's weights)
EVALUATION = "evaluation"      # changes what --test / predict compute: they refuse a change to the record
TEST_SAFE = "test_safe"        # --test may override the recorded value (logged)
PREDICT_SAFE = "predict_safe"  # predict may override the recorded value
RESUME_SAFE = "resume_safe"    # --resume may change it without breaking exact continuation (logged)
ONE_SHOT = "one_shot"          # what this command does, not a setting of the run (resume, test, ...)
UNCOMPARED = "uncompared"      # never compared with a run's record: where output goes, aliases, display
SWEEP_OWNED = "sweep_owned"    # set by `run.py sweep` for each run (they identify it); refused after `--`
LOGISTICS = "logistics"        # where and how a run executes, not what it computes: not part of its identity
ROLE_DESCRIPTIONS = {
    SHAPE: "model shape (restored from the run; a paper checkpoint's weights give it)",
    EVALUATION: "changes what --test and predict compute (they refuse a change)",
    TEST_SAFE: "--test may override it", PREDICT_SAFE: "predict may override it",
    RESUME_SAFE: "--resume may change it", ONE_SHOT: "a command, not a setting",
    UNCOMPARED: "not compared with a run's record", SWEEP_OWNED: "set by sweep for each run",
    LOGISTICS: "does not change results (not part of a run's identity)",
}


def _flag(group, *names, roles: tuple = (), **kwargs) -> argparse.Action:
    """add_argument, recording the flag's roles on its action."""
    action = group.add_argument(*names, **kwargs)
    action.roles = frozenset(roles)
    return action


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=command_name("run.py"), usage=USAGE,
        description="GazeSup: train and evaluate gaze-supervised segmentation (Zhong et al., MICCAI 2024). "
                    "Prepare a dataset with `python -m prepare`, make its gaze maps with `python -m gaze`.",
        formatter_class=_HelpFormatter)
    g = p.add_argument_group("run")
    _flag(g, "--config", default=None, roles=(ONE_SHOT, SWEEP_OWNED),
          help="YAML file whose keys are flag names, or the name of a shipped preset (e.g. kvasir_gazesup, "
               "kvasir_cpu); explicit flags override it")
    _flag(g, "-m", "--method", default="gaze_sup", choices=sorted(METHOD_ALIASES), roles=(SHAPE, EVALUATION),
          help="gaze_sup: train on gaze pseudo-masks; sparse_sup: on sparse labels (points, scribbles: "
               "ROOT/labels/<--label_dir>/, partial BCE over labelled pixels); full_sup: on ground-truth masks "
               "(gaze, sparse, full: aliases)")
    _flag(g, "--data", default="kvasir", roles=(EVALUATION, SWEEP_OWNED),
          help="dataset: a built-in spec (kvasir, prostate) or a spec YAML file")
    _flag(g, "--root", default=None, roles=(TEST_SAFE, RESUME_SAFE, LOGISTICS),
          help="prepared dataset folder (images/, masks/, gaze/, train.txt, test.txt)")
    _flag(g, "--exp_path", default="exp", roles=(UNCOMPARED, SWEEP_OWNED, LOGISTICS),
          help="runs go to EXP/<seed>/<data>/<run_id>_<timestamp>/")
    _flag(g, "--ckpt_path", default=None, roles=(ONE_SHOT, SWEEP_OWNED),
          help="a run folder or a .pth: --test and predict use its model_best.pth, --resume its model_latest.pth")
    _flag(g, "--resume", action="store_true", roles=(ONE_SHOT, SWEEP_OWNED),
          help="continue the run of --ckpt_path in its folder; its config.yaml gives every setting (only "
               "{resume_safe} may change)")
    _flag(g, "--test", action="store_true", roles=(ONE_SHOT, SWEEP_OWNED),
          help="evaluate --ckpt_path on its run's test split with its run's settings (only {test_safe} may change)")
    _flag(g, "--save_pred", action="store_true", roles=(TEST_SAFE, RESUME_SAFE, LOGISTICS),
          help="write test predictions (PNG) of the ensemble and each level")
    _flag(g, "--seed", type=int, default=0, roles=(SWEEP_OWNED,), help="random seed")
    _flag(g, "--device", default="0", roles=(TEST_SAFE, PREDICT_SAFE, RESUME_SAFE, LOGISTICS),
          help="CUDA device index; CPU is used when no GPU is visible")
    _flag(g, "--num_worker", type=int, default=min(4, _cpu_count()), roles=(TEST_SAFE, RESUME_SAFE, LOGISTICS),
          help="data loading workers (default: 4, at most the CPUs available)")
    _flag(g, "--demo", action="store_true", roles=(ONE_SHOT,),
          help="generate a small synthetic dataset with simulated gaze and train a narrow model on it (CPU, a few "
               "minutes)")
    _flag(g, "--quiet", action="store_true", roles=(UNCOMPARED, LOGISTICS), help="no progress bar")
    _flag(g, "--run_name", default=None, roles=(UNCOMPARED, SWEEP_OWNED, LOGISTICS),
          help="run folder name prefix (default: method and levels)")

    g = p.add_argument_group("data")
    _flag(g, "--spatial_size", type=int, default=384, roles=(EVALUATION,),
          help="network input side; images are resized to it")
    _flag(g, "--in_channels", type=int, default=3, roles=(SHAPE, EVALUATION),
          help="image channels (kvasir 3, prostate 1)")
    _flag(g, "--data_size_rate", type=float, default=1.0, help="use the first int(n*rate) training ids")
    _flag(g, "--train_split", default="train", help="training split file (ROOT/<name>.txt)")
    _flag(g, "--test_split", default="test", roles=(TEST_SAFE, RESUME_SAFE), help="test split file (ROOT/<name>.txt)")
    _flag(g, "--gaze_dir", default="crf_compat1",
          help="gaze-map folder under ROOT/gaze/ (heatmap for a dataset spec with crf: null)")
    _flag(g, "--thresholds", type=_float_list, default=None,
          help="gaze-map threshold per level, e.g. 0.5,0.3 (default: the dataset spec's table)")
    _flag(g, "--ignore_below", type=_float_list, default=None,
          help="gaze_sup's uncertain band (GNAN), one value per level, each below the level's threshold: pixels "
               "with ignore_below_i <= gaze < threshold_i are unlabelled (partial BCE)")
    _flag(g, "--label_dir", default=None,
          help="sparse_sup: label-map folder under ROOT/labels/ (e.g. points, scribbles); PNG maps with 0 = "
               "background, 1 = foreground, 255 = unlabelled")
    _flag(g, "--val_fraction", type=float, default=0.0,
          help="hold out this seeded fraction of the training ids (with their GT masks) to select model_best; 0 "
               "selects on the test split as the paper does")
    _flag(g, "--preload", default="auto", choices=["auto", "yes", "no"], roles=(RESUME_SAFE, LOGISTICS),
          help="decode and resize the training set once and keep it as tensors (auto: if it fits)")

    g = p.add_argument_group("model")
    _flag(g, "--model", default="unet", choices=["unet"], roles=(UNCOMPARED, LOGISTICS),
          help="accepted so the paper's scripts run unchanged, and ignored (the model is the paper's MONAI "
               "BasicUNet)")
    _flag(g, "--num_levels", type=int, default=2, roles=(SHAPE, EVALUATION), help="number of gaze levels (networks)")
    _flag(g, "--features", type=_int_list, default=[64, 128, 256, 512, 1024, 128], roles=(SHAPE, EVALUATION),
          help="U-Net widths (6 values); narrow ones for CPU")
    _flag(g, "--feat_dim", type=int, default=128, roles=(SHAPE, EVALUATION), help="feature-map channels (U-Net output)")
    _flag(g, "--propagation", default="torch", choices=["torch", "triton"],
          roles=(TEST_SAFE, PREDICT_SAFE, RESUME_SAFE, LOGISTICS),
          help="feature-propagation implementation (triton: CUDA only)")

    g = p.add_argument_group("optimisation")
    _flag(g, "--opt", default="adam", choices=["sgd", "adam"], help="sgd: momentum 0.99, Nesterov")
    _flag(g, "--lr", type=float, default=4e-4, help="learning rate")
    _flag(g, "--lr_min", type=float, default=1e-6, help="final learning rate of the cosine schedule")
    _flag(g, "--lr_scheduler", default="none", choices=["none", "cos"], help="per-epoch learning-rate schedule")
    _flag(g, "--weight_decay", type=float, default=4e-4, help="weight decay")
    _flag(g, "--max_ite", type=int, default=15000, roles=(RESUME_SAFE,), help="training iterations")
    _flag(g, "--warmup_ite", type=int, default=0, help="warm-up length, compared with the epoch as in the paper's code")
    _flag(g, "-bs", "--batch_size", type=int, default=8, help="batch size (per process)")
    _flag(g, "--cons_weight", type=float, default=3.0, help="weight of the cross-level consistency loss")
    _flag(g, "--cons_mode", default="prop", choices=["pure", "prop"],
          help="consistency on propagated or plain predictions")
    _flag(g, "--fp16", action="store_true", roles=(UNCOMPARED,),
          help="float16 autocast with a gradient scaler (same as --amp fp16)")
    _flag(g, "--amp", default="none", choices=["none", "fp16", "bf16"], roles=(TEST_SAFE, PREDICT_SAFE),
          help="autocast precision")
    _flag(g, "--channels_last", action="store_true", roles=(RESUME_SAFE, LOGISTICS),
          help="channels_last memory format (faster convs on GPU)")
    _flag(g, "--compile", action="store_true", roles=(RESUME_SAFE, LOGISTICS),
          help="torch.compile the model (static shapes)")
    _flag(g, "--deterministic", action="store_true", roles=(LOGISTICS,),
          help="deterministic algorithms (bit-identical CPU reruns)")

    g = p.add_argument_group("logging")
    _flag(g, "--log_step", type=int, default=100, roles=(RESUME_SAFE, LOGISTICS), help="log every N iterations")
    _flag(g, "--val_step", type=int, default=1000, roles=(RESUME_SAFE,),
          help="evaluate every N iterations (and after the last)")
    _flag(g, "--save_step", type=int, default=5000, roles=(RESUME_SAFE, LOGISTICS),
          help="save model_ite<N>.pth every N iterations")
    lists = {role: ", ".join(f"--{a.dest}" for a in p._actions if role in getattr(a, "roles", ()))
             for role in (TEST_SAFE, RESUME_SAFE)}
    for action in p._actions:  # the help of --test / --resume names what the roles allow
        if action.help and "{" in action.help:
            action.help = action.help.format(**lists)
    return p


FLAG_ROLES: dict[str, frozenset] = {a.dest: a.roles for a in build_parser()._actions if hasattr(a, "roles")}


_DEFAULTS: dict = {}


def default_settings() -> dict:
    """Every run.py flag's default (a copy): the settings a record lacks (a run recorded before a flag existed
    ran with its default)."""
    if not _DEFAULTS:
        _DEFAULTS.update(vars(build_parser().parse_args([])))
    return copy.deepcopy(_DEFAULTS)


def flags_with(role: str) -> tuple[str, ...]:
    """The flags (dest names, in declaration order) that have `role`."""
    return tuple(name for name, roles in FLAG_ROLES.items() if role in roles)


# what a run records and what defines its experiment (engine.run_folder, common.identity), from the roles:
# the one-shot command keys are never recorded as settings (and refused in a --config file); a run's
# identity, compared by the sweep and summarize, is every recorded setting but these and the seed
COMMANDS = flags_with(ONE_SHOT)
RESULT_NEUTRAL = tuple(dict.fromkeys(COMMANDS + flags_with(UNCOMPARED) + flags_with(LOGISTICS) + ("seed",)))


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
    """The flags of a --config YAML file (its `base:` chain resolved), validated key by key."""
    try:
        raw = read_recipe(path)
    except RecipeError as e:
        raise FlagError(str(e)) from None
    actions = {a.dest: a for a in parser._actions if a.dest != "help"}
    unknown = sorted(str(k) for k in raw if k not in actions)
    if unknown:
        raise FlagError(f"--config {path}: unknown key(s) {unknown}; keys are flag names such as lr, max_ite")
    acting = [f"{k}: {raw[k]}" for k in COMMANDS if k != "config" and raw.get(k) not in (None, False)]
    if acting:  # e.g. a resumed run's config.yaml: reusing it must start a new run, never resume the old one
        raise FlagError(f"--config {path}: {', '.join(acting)} is a command, not a setting; remove it from the file "
                        f"and pass the command on the command line (e.g. --resume --ckpt_path RUN)")
    return {k: _yaml_value(actions[k], v, f"--config {path}: key {k}") for k, v in raw.items() if k not in COMMANDS}


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
        thresholds = args.thresholds or spec.level_thresholds(args.num_levels)
        if args.ignore_below is not None:
            check_ignore_below(args.ignore_below, thresholds)
    elif args.ignore_below is not None:
        raise FlagError(f"--ignore_below is for -m gaze_sup (the gaze uncertain band), not -m {args.method}",
                        "ignore_below")
    if args.method == "sparse_sup" and not args.label_dir and not (args.test or args.resume):
        raise FlagError("-m sparse_sup needs --label_dir (a folder under ROOT/labels/, e.g. points or scribbles)",
                        "label_dir")
    if args.label_dir is not None and args.method != "sparse_sup":
        raise FlagError(f"--label_dir is for -m sparse_sup, not -m {args.method}", "label_dir")
    if args.label_dir is not None and (not args.label_dir or "/" in args.label_dir or "\\" in args.label_dir
                                       or args.label_dir in (".", "..")):
        raise FlagError(f"--label_dir {args.label_dir!r}: expected a folder name under ROOT/labels/ (e.g. points)",
                        "label_dir")
    if args.test and args.resume:
        raise FlagError("--test and --resume exclude each other")
    if (args.test or args.resume) and not args.ckpt_path:
        raise FlagError(f"--{'test' if args.test else 'resume'} needs --ckpt_path (a run folder or a .pth file)")


def check_ignore_below(values: list[float], thresholds: list[float]) -> None:
    """--ignore_below: one value per level, 0 <= L_i < threshold_i (else the band is empty or inverted)."""
    if len(values) != len(thresholds):
        raise FlagError(f"--ignore_below {values}: expected {len(thresholds)} value(s), one per level "
                        f"(thresholds {thresholds})", "ignore_below")
    bad = [f"{v:g} >= {t:g}" for v, t in zip(values, thresholds) if not 0 <= v < t]
    if bad or any(v < 0 for v in values):
        raise FlagError(f"--ignore_below {values}: each value must be >= 0 and below its level's threshold "
                        f"(thresholds {thresholds}); got {', '.join(bad) or 'a negative value'}", "ignore_below")


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
    if pre.config:  # a preset's name (as `sweep --presets`) or a path
        try:
            pre.config = str(config_path(pre.config))
        except RecipeError as e:
            raise FlagError(str(e), "config") from None
    config = load_config(pre.config, parser) if pre.config else {}
    parser.set_defaults(**config)
    args = parser.parse_args(argv)
    args.config = pre.config
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
