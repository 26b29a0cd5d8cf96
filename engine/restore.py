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
from engine.run_folder import RunError, resolve_checkpoint
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
            record = {**saved, **(record or {})}
    return record, run_dir


def merge_flags(record: dict[str, Any], explicit: dict[str, Any], command: str, source: Path) -> tuple:
    """(settings, notes): the record with the safe explicit flags applied; a RunError lists the others."""
    config, notes, refused = dict(record), [], []
    for key, value in explicit.items():
        if key in COMMAND_KEYS or record.get(key) == value:
            continue
        if key in SAFE[command]:
            notes.append(f"--{key} {value} (the run recorded {record.get(key)})")
            config[key] = value
        elif command != "resume" and key not in EVALUATION_KEYS:
            notes.append(f"--{key} {value} ignored: it does not change an evaluation (the run recorded "
                         f"{record.get(key)})")
        else:
            refused.append(f"--{key} {value} (the run recorded {record.get(key)})")
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
        config, notes = merge_flags({**defaults, **record}, explicit, command, path)
        return Restored(path, ckpt, state, config, run_dir, True, notes)
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


def restored_model(restored: Restored) -> torch.nn.Module:
    """The model of `restored` with its checkpoint's weights (on the CPU), for evaluation; a mismatch names the file.

    Evaluation never runs the feature propagation, so the model is built with the torch one: a run trained
    with --propagation triton evaluates on a machine without CUDA."""
    model = make_model({**restored.config, "propagation": "torch"})
    try:
        load_model_state(model, restored.state_dict, restored.path)
    except ValueError as e:
        shape = ", ".join(f"{k}={restored.config.get(k)}" for k in SHAPE_KEYS)
        raise RunError(f"incompatible checkpoint for a model with {shape}:\n  {e}") from None
    return model
