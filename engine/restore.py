"""A checkpoint (+ its run's config.yaml + explicit flags) -> the settings and the model, for --test,
--resume and predict alike.

Precedence, one rule for all three commands:
1. What the run recorded is the truth: the checkpoint's "args" (this project's checkpoints), completed by
   the run folder's config.yaml. Model shape, data, spatial_size, thresholds, method... all come from it.
2. A flag given on the command line (or in --config) may change only what is safe for the command
   (`SAFE`); the change is logged. Any other flag that differs from the record is an error listing
   each difference (for --test and predict: a flag that changes the evaluation, `EVALUATION_KEYS`; the
   training-only ones are ignored with a log line). A flag equal to the record is accepted silently.
3. A paper-format checkpoint records nothing: the model shape is read off the weights, the rest comes
   from the flags; --spatial_size is then required (guessing it would give a silently wrong number;
   the paper's scripts use 224).
"""
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from common.checksums import BUNDLE_CARD, BUNDLE_WEIGHTS
from common.dataspec import DataSpec, SpecError, load_spec, parse_spec, spec_path, spec_record
from engine.run_folder import RunError, read_recorded_spec, resolve_checkpoint
from models.checkpoint import (
    checkpoint_state_dict,
    infer_model_args,
    load_checkpoint,
    load_model_state,
)
from models.segmentation_net import build_model
from parse_args import (
    EVALUATION,
    ONE_SHOT,
    PREDICT_SAFE,
    RESUME_SAFE,
    SHAPE,
    TEST_SAFE,
    UNCOMPARED,
    flags_with,
)

# the key sets of the rule, derived from the flags' roles (parse_args.py declares each flag once)
SHAPE_KEYS = flags_with(SHAPE)
# flags that say what to do, not what the run is: never compared with the record
COMMAND_KEYS = flags_with(ONE_SHOT) + flags_with(UNCOMPARED)
SAFE = {"test": flags_with(TEST_SAFE), "predict": flags_with(PREDICT_SAFE), "resume": flags_with(RESUME_SAFE)}
# flags that change what an evaluation computes: --test and predict refuse a change to them and ignore
# (with a log line) the training-only ones; --resume refuses every change outside SAFE
EVALUATION_KEYS = flags_with(EVALUATION)


@dataclass
class Restored:
    """What a later command knows about a run: its checkpoint, settings and folder."""
    path: Path
    ckpt: dict
    state_dict: dict  # the weights, already checked finite by models.checkpoint.checkpoint_state_dict
    config: dict[str, Any]
    run_dir: Path | None = None  # the run folder holding the checkpoint (with a config.yaml), if any
    recorded: bool = True  # False: a paper-format checkpoint (settings from the flags)
    notes: list[str] = field(default_factory=list)  # what the flags overrode, for the log
    spec: DataSpec | None = None  # the dataset spec the run recorded (config["data"] is then this spec)


def check_record_agrees(saved: dict, args: dict, run_dir: Path, path: Path) -> None:
    """config.yaml and the checkpoint record the same run: a hand edit of config.yaml (e.g. lr) would
    otherwise be overwritten (or half applied) without a word. Flags that --resume may change and command
    keys are not compared (an older checkpoint of the run may have seen another --max_ite)."""
    ignore = set(COMMAND_KEYS) | set(SAFE["resume"])
    differ = [f"{k}: config.yaml {saved[k]!r}, checkpoint {args[k]!r}" for k in sorted(saved.keys() & args.keys())
              if k not in ignore and saved[k] != args[k]]
    if differ:
        raise RunError(f"{run_dir / 'config.yaml'} disagrees with {path} (was it edited?): {'; '.join(differ)}. "
                       f"The checkpoint's settings are the run's; undo the edit, or start a new run with "
                       f"--config {run_dir / 'config.yaml'} and the change")


def recorded_spec(ckpt: dict, run_dir: Path | None, data, command: str, source: Path) -> tuple:
    """(the DataSpec the run recorded or None, notes): the checkpoint's copy, else RUN/data_spec.yaml.
    The spec file the run named may have changed since: --test and predict say so and use the record,
    --resume refuses (one run would be trained on two datasets)."""
    raw = ckpt.get("data_spec") if isinstance(ckpt.get("data_spec"), dict) else None
    if raw is None and run_dir is not None:
        raw = read_recorded_spec(run_dir)
    if raw is None:
        return None, []
    spec = parse_spec(raw, data)
    try:
        now = spec_record(load_spec(data))
        where = spec_path(data)
    except SpecError:  # the file is gone or unreadable: the record is all a later command needs
        return spec, []
    if now == raw:
        return spec, []
    changed = ", ".join(f"{k}" for k in raw if raw.get(k) != now.get(k))
    if command == "resume":
        raise RunError(f"{source}: the dataset spec {where} changed since the run recorded it ({changed}); "
                       f"resuming would train one run on two datasets. Restore the file (the run's copy is "
                       f"{run_dir / 'data_spec.yaml' if run_dir else 'in the checkpoint'}) or start a new run")
    return spec, [f"the dataset spec {where} changed since the run recorded it ({changed}); using the recorded spec"]


def read_record(path: Path, ckpt: dict) -> tuple:
    """(recorded settings or None, the run folder or None): the checkpoint's args completed by config.yaml,
    or, for an exported bundle's weights.pth, by its model card's flags."""
    run_dir = path.parent if (path.parent / "config.yaml").is_file() else None
    record = dict(ckpt["args"]) if isinstance(ckpt.get("args"), dict) else None
    card = path.parent / BUNDLE_CARD
    if path.name == BUNDLE_WEIGHTS and card.is_file():
        try:
            flags = json.loads(card.read_text(encoding="utf-8"))["flags"]
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
            raise RunError(f"{card}: cannot read the bundle's flags ({e})") from None
        if isinstance(flags, dict):
            record = {**flags, **(record or {})}
    if run_dir is not None:
        try:
            saved = yaml.safe_load((run_dir / "config.yaml").read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise RunError(f"{run_dir / 'config.yaml'}: cannot read the run's settings ({e})") from None
        if isinstance(saved, dict):
            if record is not None:
                check_record_agrees(saved, record, run_dir, path)
            record = {**saved, **(record or {})}
    return record, run_dir


def merge_flags(record: dict[str, Any], explicit: dict[str, Any], command: str, source: Path) -> tuple:
    """(settings, notes): the record with the safe explicit flags applied; a RunError lists the others."""
    config, notes, refused = dict(record), [], []
    for key, value in explicit.items():
        if key in COMMAND_KEYS or record.get(key) == value:
            continue
        if key == "data" and isinstance(record.get("data"), DataSpec) and value is not None \
                and spec_record(load_spec(value)) == spec_record(record["data"]):
            continue  # the same spec, by another path (relative, absolute) or a copy
        shown = record.get(key).source if isinstance(record.get(key), DataSpec) else record.get(key)
        if key in SAFE[command]:
            notes.append(f"--{key} {value} (the run recorded {shown})")
            config[key] = value
        elif command != "resume" and key not in EVALUATION_KEYS:
            notes.append(f"--{key} {value} ignored: it does not change an evaluation (the run recorded {shown})")
        else:
            what = "a dataset spec with other content" if key == "data" else shown
            refused.append(f"--{key} {value} (the run recorded {what})")
    if refused:
        allowed = ", ".join(f"--{k}" for k in SAFE[command])
        raise RunError(f"{source}: the run's settings come from what it recorded, and these flags differ from it: "
                       f"{'; '.join(refused)} (for {command}, only {allowed} may change)")
    return config, notes


def restore(ckpt_path, explicit: dict[str, Any], command: str, defaults: dict[str, Any]) -> Restored:
    """Load `ckpt_path` (a .pth, or a run folder: model_latest.pth for resume, else model_best.pth) and
    settle its settings by the module's precedence rule.

    Args:
        ckpt_path: --ckpt_path.
        explicit: the flags the user set (name -> value).
        command: "test", "resume" or "predict".
        defaults: every setting's default (used for keys a record lacks, and for paper checkpoints).
    """
    path = resolve_checkpoint(ckpt_path, "model_latest.pth" if command == "resume" else "model_best.pth")
    ckpt = load_checkpoint(path)  # refuses anything but a dict
    state = checkpoint_state_dict(ckpt, path)  # refuses a missing state dict and non-finite weights
    record, run_dir = read_record(path, ckpt)
    if record is not None:
        spec, spec_notes = recorded_spec(ckpt, run_dir, record.get("data"), command, path)
        if spec is not None:
            record["data"] = spec
        config, notes = merge_flags({**defaults, **record}, explicit, command, path)
        return Restored(path, ckpt, state, config, run_dir, True, spec_notes + notes, spec)
    inferred = infer_model_args(state)
    clash = [f"--{k} {explicit[k]} (the weights say {inferred[k]})" for k in SHAPE_KEYS
             if k in explicit and k in inferred and explicit[k] != inferred[k]]
    if clash:
        raise RunError(f"{path}: the model shape flags disagree with the checkpoint's weights: {'; '.join(clash)}")
    if explicit.get("spatial_size") is None:
        raise RunError(f"{path} does not record the input size it was trained at; pass --spatial_size "
                       "(the paper's scripts use 224)")
    config = {**defaults, **explicit, **inferred}
    if config.get("method") == "gaze_sup" and not config.get("num_levels"):
        raise RunError(f"{path}: cannot tell the number of levels from the checkpoint; pass --num_levels")
    return Restored(path, ckpt, state, config, run_dir, False, [])


def make_model(config: dict[str, Any]) -> torch.nn.Module:
    """The network of a run's settings: every model-shape flag (parse_args.py's SHAPE role) goes to
    models.build_model by name, so a new shape flag is declared there and used in models/ only."""
    shape = {k: config.get(k) for k in SHAPE_KEYS}
    shape["num_levels"] = shape.get("num_levels") or 1
    shape["features"] = tuple(shape["features"])
    return build_model(**shape, propagation=config.get("propagation") or "torch")


def load_restored_weights(model: torch.nn.Module, restored: Restored) -> None:
    """The checkpoint's weights into `model`; weights that do not fit are one RunError naming the file and the
    model's shape (--test, predict and --resume alike)."""
    try:
        load_model_state(model, restored.state_dict, restored.path)
    except ValueError as e:
        shape = ", ".join(f"{k}={restored.config.get(k)}" for k in SHAPE_KEYS)
        raise RunError(f"incompatible checkpoint for a model with {shape}:\n  {e}") from None


def restored_model(restored: Restored) -> torch.nn.Module:
    """The model of `restored` with its checkpoint's weights (on the CPU), for evaluation; a mismatch names the file.

    Evaluation never runs the feature propagation, so the model is built with the torch one: a run trained
    with --propagation triton evaluates on a machine without CUDA."""
    model = make_model({**restored.config, "propagation": "torch"})
    load_restored_weights(model, restored)
    return model
