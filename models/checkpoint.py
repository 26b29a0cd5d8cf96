"""Checkpoints in the paper's format: {"state_dict", "opt", "epoch", "iteration",
"best_performance", "best_iteration"}, with `best_performance` a NumPy float64.

Loading always uses torch.load(weights_only=True). The only extra globals allowed are those a
pickled NumPy float64 needs: the scalar constructor (under its NumPy 2 name `numpy._core...` and
its NumPy 1 name `numpy.core...`, since released checkpoints may come from either), `numpy.dtype`
and `numpy.dtypes.Float64DType`. Anything else is refused, never unpickled.

What a loaded file must be, beyond safe to unpickle: a dict (a pickled list or a bare tensor is refused),
whose recorded model flags ("args", this project's checkpoints) describe a model that can be built, and
whose weights are finite (checked where the state dict is taken out, `checkpoint_state_dict`).
Temporaries (`*.pth.tmp`) left by a killed save are removed by the next save into their folder (not by a load:
reading a checkpoint from a user's folder must not delete files there that may not be ours).
"""
import fcntl
import io
import os
import pickle
import pickletools
import re
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from common.errors import UserError
from common.methods import METHODS

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

    The temporary is locked (flock) while it is written, so that `remove_stale_temporaries`, run first,
    can tell a temporary left by a killed save (lock free) from one being written now (locked).

    Args:
        path: destination file; its folder is created if needed.
        state: the checkpoint dict.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        with open(tmp, "wb") as f:
            _try_lock(f)
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX: readers see the old or the new file, never half
    finally:
        if tmp.exists():
            tmp.unlink()


TMP_SUFFIX = ".tmp"
STALE_AFTER_S = 2.0  # a temporary younger than this may have just been created, not yet locked


def _try_lock(f, blocking: bool = True) -> bool:
    """flock(LOCK_EX) on an open file; False when another process holds it or the file system has no locks."""
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        return True
    except OSError:
        return False


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the `*.pth.tmp` files of `folder` that no running save is writing (their lock is free and
    they are older than STALE_AFTER_S seconds): what a save killed by SIGKILL or a power cut leaves.
    Never raises (a read-only folder is simply left as it is).

    Args:
        folder: a checkpoint folder.
    Returns:
        The removed paths.
    """
    removed = []
    try:
        candidates = sorted(Path(folder).glob("*.pth" + TMP_SUFFIX))
    except OSError:
        return removed
    for tmp in candidates:
        try:
            if not tmp.is_file():
                continue
            with open(tmp, "rb") as f:
                # the lock is free: the writer, if any, is dead (its lock died with it). The age is read
                # after locking, so a save that has just reopened (truncated) this name is left alone.
                if _try_lock(f, blocking=False) and time.time() - os.fstat(f.fileno()).st_mtime >= STALE_AFTER_S:
                    tmp.unlink()
                    removed.append(tmp)
        except OSError:
            continue
    return removed


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Load a checkpoint with weights_only=True (plus the NumPy float64 globals only).

    Args:
        path: checkpoint file.
        map_location: passed to torch.load.
    Returns:
        The checkpoint dict (its recorded model flags, if any, checked).
    Raises:
        FileNotFoundError: no such file.
        CheckpointError: the file is corrupt / not a torch checkpoint, contains objects that are not allowed
            (these are refused, never unpickled), is not a dict, or records model flags no model has.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: corrupt or not a PyTorch checkpoint (empty file)")
    try:
        with torch.serialization.safe_globals(NUMPY_FLOAT64_GLOBALS), warnings.catch_warnings():
            # torch warns about pickle protocols > 2 before failing on them; the failure is reported below
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        # torch reports a disallowed class/function as "... GLOBAL mod.name ..." and a disallowed
        # object construction as "Can only build ... but got <class ...>", the first one only. Pickle
        # opcodes the safe unpickler does not know (protocol 4's FRAME, ...) stop it before it reaches any
        # global, so the pickle is also read statically (opcodes only, nothing is executed) for all the
        # globals it names.
        found = re.findall(r"GLOBAL ([\w.]+)", msg) + re.findall(r"but got (<class '[\w.]+'>)", msg) \
            + _disallowed_globals(path)
        if found:
            raise _refused(path, found) from None
        if "Unsupported operand 149" in msg:  # FRAME: a pickle of protocol >= 4 holding only safe objects
            raise CheckpointError(f"{path}: written with pickle protocol 4 or later, which the safe loader cannot "
                                  "read; re-save it with torch.save's default protocol") from None
        raise CheckpointError(f"{path}: corrupt or not a PyTorch checkpoint ({_reason(msg)})") from None
    except Exception as e:  # noqa: BLE001  (torch.load raises many types for garbage: IndexError for text, ...)
        raise CheckpointError(f"{path}: corrupt or not a PyTorch checkpoint "
                              f"({type(e).__name__}: {_reason(str(e))})") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: holds a {type(ckpt).__name__}, not a checkpoint (expected a dict: the "
                              "paper's {'state_dict': ..., 'opt': ..., ...} or a bare name->tensor state dict)")
    if isinstance(ckpt.get("args"), dict):
        check_recorded_args(ckpt["args"], path)
    return ckpt


def _refused(path: Path, found: list[str]) -> CheckpointError:
    return CheckpointError(
        f"{path}: refused: holds objects other than tensors ({', '.join(sorted(set(found)))}); nothing in it "
        "was unpickled (a checkpoint may hold only tensors, plain containers/numbers and NumPy float64)")


def _allowed_global_names() -> set:
    """"module.name" of every global the safe loader accepts: torch's own list plus ours."""
    names = {f"{getattr(g, '__module__', '')}.{getattr(g, '__name__', '')}" for g in NUMPY_FLOAT64_GLOBALS
             if not isinstance(g, tuple)}
    names |= {name for g, name in (g for g in NUMPY_FLOAT64_GLOBALS if isinstance(g, tuple))}
    try:  # a private helper; when it moves, only torch.* and collections.OrderedDict count as known
        from torch._weights_only_unpickler import _get_allowed_globals
        names |= set(_get_allowed_globals())
    except (ImportError, TypeError):
        names |= {"collections.OrderedDict"}
    return names


SCAN_LIMIT = 64 << 20  # bytes of a non-zip file read for its globals (a corrupt 10 GB file is not read whole)


def _disallowed_globals(path: Path) -> list[str]:
    """Globals (module.name) that the pickle in `path` refers to and the safe loader does not allow,
    found by reading its opcodes with pickletools (nothing is executed). [] when none or unreadable."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                streams = [z.read(n) for n in z.namelist() if n.endswith(".pkl")]
        else:  # legacy format or a bare pickle: the pickles come first, tensor bytes after them
            with open(path, "rb") as f:
                streams = [f.read(SCAN_LIMIT)]
    except (OSError, zipfile.BadZipFile, RuntimeError):
        return []
    allowed, found = _allowed_global_names(), []
    for data in streams:
        found += [g for g in _pickle_globals(data) if g not in allowed and not g.startswith("torch.")]
    return sorted(set(found))


def _pickle_globals(data: bytes) -> list[str]:
    """The globals named by the pickles at the start of `data` (several in a row: torch's legacy format),
    from GLOBAL / STACK_GLOBAL opcodes; stops quietly at the first byte that is not a pickle.

    STACK_GLOBAL takes module and name from the two values pushed just before it: strings, possibly fetched
    from the memo. `pushed` records what each opcode pushed (the string, or None for anything else)."""
    strings = ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING")
    silent = ("MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT", "FRAME", "PROTO")  # push nothing
    found, stream = [], io.BytesIO(data)
    while stream.tell() < len(data):
        pushed: list = []
        memo: dict = {}
        try:
            for op, arg, _ in pickletools.genops(stream):
                name = op.name
                if name == "GLOBAL":
                    found.append(str(arg).replace(" ", "."))
                    pushed.append(None)
                elif name == "STACK_GLOBAL":
                    if len(pushed) >= 2 and isinstance(pushed[-2], str) and isinstance(pushed[-1], str):
                        found.append(f"{pushed[-2]}.{pushed[-1]}")
                    else:
                        found.append("<unknown global>")  # cannot tell which: still not a tensor
                    pushed.append(None)
                elif name in strings:
                    pushed.append(str(arg))
                elif name == "MEMOIZE":
                    memo[len(memo)] = pushed[-1] if pushed else None
                elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                    memo[int(arg)] = pushed[-1] if pushed else None
                elif name in ("GET", "BINGET", "LONG_BINGET"):
                    pushed.append(memo.get(int(arg)))
                elif name not in silent:
                    pushed.append(None)
        except (ValueError, EOFError, KeyError, IndexError):  # not (or no longer) a pickle: raw storage bytes
            break
    return found


def check_recorded_args(saved: dict, path: str | os.PathLike | None = None) -> None:
    """The model flags a checkpoint records ("args") must describe a model that can be built.

    Args:
        saved: the checkpoint's "args" dict (only the model keys present in it are checked).
        path: the checkpoint file, named in the error.
    Raises:
        CheckpointError: naming the file, the key, its value and what was expected.
    """
    def positive_int(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 1

    checks = {"method": (lambda v: v in METHODS,
                         ", ".join(f"{m!r}" for m in METHODS[:-1]) + f" or {METHODS[-1]!r}"),
              "in_channels": (positive_int, "an integer >= 1"),
              "feat_dim": (positive_int, "an integer >= 1"),
              "features": (lambda v: isinstance(v, (list, tuple)) and len(v) == 6 and all(map(positive_int, v)),
                           "6 integers >= 1"),
              "spatial_size": (positive_int, "an integer >= 1")}
    if saved.get("method", "gaze_sup") in ("gaze_sup", "sparse_sup"):  # full_sup runs record the unused default too
        checks["num_levels"] = (positive_int, "an integer >= 1")
    for key, (ok, expected) in checks.items():
        if key in saved and not ok(saved[key]):
            raise CheckpointError(f"{path if path is not None else 'checkpoint'}: the recorded flag {key} is "
                                  f"{saved[key]!r}, expected {expected}; the file is damaged or was not written "
                                  "by this project")


def _reason(msg: str) -> str:
    """The informative line of a torch.load error (torch puts it after "WeightsUnpickler error:")."""
    if "WeightsUnpickler error:" in msg:
        msg = msg.split("WeightsUnpickler error:", 1)[1]
    lines = [line.strip() for line in msg.splitlines() if line.strip()]
    return lines[0][:200] if lines else "no details"


def checkpoint_state_dict(ckpt: dict, path: str | os.PathLike | None = None) -> dict:
    """The model state dict inside a loaded checkpoint: ckpt["state_dict"] (the paper's format), or ckpt
    itself when it is already a bare state dict (str -> tensor). Its floating-point tensors must be finite.

    Args:
        ckpt: what `load_checkpoint` returned.
        path: the checkpoint file, named in errors (without it, messages start with the reason).
    Raises:
        CheckpointError: no state dict in it, or a weight tensor holding NaN/inf (naming the first such tensor).
    """
    where = f"{path}: " if path is not None else ""
    if isinstance(ckpt, dict) and isinstance(ckpt.get("state_dict"), dict):
        state_dict = ckpt["state_dict"]
    elif isinstance(ckpt, dict) and ckpt and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                 for k, v in ckpt.items()):
        state_dict = ckpt
    else:
        keys = list(ckpt)[:10] if isinstance(ckpt, dict) else None
        raise CheckpointError(f"{where}holds no model state dict: expected a dict with a 'state_dict' entry or a "
                              f"bare name->tensor dict, got {type(ckpt).__name__}"
                              + (f" with keys {keys}" if keys is not None else ""))
    bad = [k for k, v in state_dict.items()
           if isinstance(v, torch.Tensor) and v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        v = state_dict[bad[0]]
        kinds = " and ".join(n for n, m in (("NaN", torch.isnan(v)), ("inf", torch.isinf(v))) if m.any())
        raise CheckpointError(f"{where}refused: the weights are not finite ({len(bad)} of {len(state_dict)} "
                              f"tensors; {bad[0]!r} holds {kinds}); a diverged run's weights predict nothing")
    return state_dict


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
        where = path if path is not None else "<in memory>"
        parts = [f"state dict from {where} does not match {type(model).__name__}"]
        for name, items in (("missing keys", missing), ("unexpected keys", unexpected),
                            ("shape mismatches", shapes)):
            if items:
                more = f" ... (+{len(items) - 10} more)" if len(items) > 10 else ""
                parts.append(f"{len(items)} {name}: {items[:10]}{more}")
        raise ValueError("\n  ".join(parts))
    model.load_state_dict(state_dict, strict=True)


def infer_model_args(state_dict: dict) -> dict:
    """Method, levels, input channels and widths from a state dict's names and shapes (empty if unknown)."""
    keys = [k.removeprefix("module.") for k in state_dict]
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
