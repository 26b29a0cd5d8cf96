"""Checkpoints in the paper's format: {"state_dict", "opt", "epoch", "iteration",
"best_performance", "best_iteration"}, with `best_performance` a NumPy float64.

Loading always uses torch.load(weights_only=True). The only extra globals allowed are those a
pickled NumPy float64 needs: the scalar constructor (under its NumPy 2 name `numpy._core...` and
its NumPy 1 name `numpy.core...`, since released checkpoints may come from either), `numpy.dtype`
and `numpy.dtypes.Float64DType`. Anything else is refused, never unpickled.
"""
import os
import pickle
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from common.errors import UserError

_SCALAR = np._core.multiarray.scalar if hasattr(np, "_core") else np.core.multiarray.scalar
NUMPY_FLOAT64_GLOBALS = [
    (_SCALAR, "numpy._core.multiarray.scalar"),
    (_SCALAR, "numpy.core.multiarray.scalar"),
    np.dtype,
    np.dtypes.Float64DType,
]


class CheckpointError(UserError):
    """A checkpoint file that cannot be read safely (corrupt, or holding disallowed objects)."""


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Atomically write `state` to `path`: write `path.tmp` in the same folder, fsync, rename.

    Args:
        path: destination file; its folder is created if needed.
        state: the checkpoint dict.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX: readers see the old or the new file, never half
    finally:
        if tmp.exists():
            tmp.unlink()


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Load a checkpoint with weights_only=True (plus the NumPy float64 globals only).

    Args:
        path: checkpoint file.
        map_location: passed to torch.load.
    Raises:
        FileNotFoundError: no such file.
        CheckpointError: the file is corrupt / not a torch checkpoint, or contains objects that
            are not allowed (these are refused, never unpickled).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: corrupt or not a PyTorch checkpoint (empty file)")
    try:
        with torch.serialization.safe_globals(NUMPY_FLOAT64_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        # torch reports a disallowed class/function as "... GLOBAL mod.name ..." and a disallowed
        # object construction as "Can only build ... but got <class ...>".
        found = re.findall(r"GLOBAL ([\w.]+)", msg) or re.findall(r"but got (<class '[\w.]+'>)", msg)
        if found:
            raise CheckpointError(
                f"{path}: the file contains objects that are not allowed in a checkpoint "
                f"({', '.join(sorted(set(found)))}); refusing to unpickle them "
                f"(only tensors, plain containers/numbers and NumPy float64 are accepted)") from None
        raise CheckpointError(f"{path}: corrupt or not a PyTorch checkpoint ({_reason(msg)})") from e
    except Exception as e:  # torch.load raises many types for garbage (IndexError for a text file, ...)
        raise CheckpointError(f"{path}: corrupt or not a PyTorch checkpoint "
                              f"({type(e).__name__}: {_reason(str(e))})") from e


def _reason(msg: str) -> str:
    """The informative line of a torch.load error (torch puts it after "WeightsUnpickler error:")."""
    if "WeightsUnpickler error:" in msg:
        msg = msg.split("WeightsUnpickler error:", 1)[1]
    lines = [line.strip() for line in msg.splitlines() if line.strip()]
    return lines[0][:200] if lines else "no details"


def checkpoint_state_dict(ckpt: dict, path: str | os.PathLike | None = None) -> dict:
    """The model state dict inside a loaded checkpoint: ckpt["state_dict"] (the paper's format),
    or ckpt itself when it is already a bare state dict (str -> tensor)."""
    if isinstance(ckpt, dict) and isinstance(ckpt.get("state_dict"), dict):
        return ckpt["state_dict"]
    if isinstance(ckpt, dict) and ckpt and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                               for k, v in ckpt.items()):
        return ckpt
    keys = list(ckpt)[:10] if isinstance(ckpt, dict) else None
    raise ValueError(f"checkpoint {path or ''} holds no model state dict: expected a dict with a 'state_dict' entry "
                     f"or a bare name->tensor dict, got {type(ckpt).__name__}"
                     + (f" with keys {keys}" if keys is not None else ""))


def load_model_state(model: nn.Module, state_dict: dict, path: str | os.PathLike | None = None) -> None:
    """Load `state_dict` into `model` strictly, after stripping a DDP "module." prefix.

    Args:
        model: the network.
        state_dict: name -> tensor.
        path: the checkpoint file, named in error messages.
    Raises:
        ValueError: listing missing keys, unexpected keys and shape mismatches (first 10 each).
    """
    if state_dict and all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
              for k, v in state_dict.items() if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    if missing or unexpected or shapes:
        parts = [f"state dict from {path if path is not None else '<in memory>'} does not match "
                 f"{type(model).__name__}"]
        for name, items in (("missing keys", missing), ("unexpected keys", unexpected),
                            ("shape mismatches", shapes)):
            if items:
                more = f" ... (+{len(items) - 10} more)" if len(items) > 10 else ""
                parts.append(f"{len(items)} {name}: {items[:10]}{more}")
        raise ValueError("\n  ".join(parts))
    model.load_state_dict(state_dict, strict=True)


def infer_model_args(state_dict: dict) -> dict:
    """Method, levels, input channels and widths from a state dict's names and shapes (empty if unknown)."""
    keys = [k[len("module."):] if k.startswith("module.") else k for k in state_dict]
    sd = dict(zip(keys, state_dict.values()))
    levels = {int(m.group(1)) for k in keys if (m := re.match(r"model\.(\d+)\.encoder\.", k))}
    if levels:
        method, prefix = "gaze_sup", "model.0."
    elif any(k.startswith("encoder.") for k in keys):
        method, prefix = "full_sup", ""
    else:
        return {}
    enc = prefix + "encoder."
    names = [enc + "conv_0.conv_0.conv.weight"] + [enc + f"down_{i}.convs.conv_0.conv.weight" for i in range(1, 5)] \
        + [enc + "upcat_1.convs.conv_1.conv.weight", enc + "final_conv.weight"]
    if not all(n in sd for n in names):
        return {"method": method, **({"num_levels": len(levels)} if levels else {})}
    out = {"method": method, "in_channels": int(sd[names[0]].shape[1]),
           "features": [int(sd[n].shape[0]) for n in names[:6]], "feat_dim": int(sd[names[6]].shape[0])}
    if levels:
        out["num_levels"] = len(levels)
    return out
