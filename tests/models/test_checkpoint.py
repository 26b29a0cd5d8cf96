"""Checkpoint I/O: the paper's format round-trips, unsafe or corrupt files are refused with the
file named, and mismatched state dicts are listed."""
import fcntl
import hashlib
import io
import os
import pickle
import time
import warnings
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from models import CheckpointError, SegNet, checkpoint_state_dict, load_checkpoint, load_model_state, save_checkpoint
from models.checkpoint import remove_stale_temporaries

TINY = {"features": (8, 8, 16, 16, 32, 8), "feat_dim": 8}


class Custom:
    def __init__(self):
        self.value = 1


class Payload:
    """Unpickling this would create a directory: proves whether code ran."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (os.mkdir, (self.target,))


def paper_state(model: nn.Module) -> dict:
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model(torch.randn(1, 3, 16, 16))["logits"].mean().backward()
    opt.step()  # fills the momentum buffers so "opt" holds tensors too
    return {"state_dict": model.state_dict(), "opt": opt.state_dict(), "epoch": 3, "iteration": 300,
            "best_performance": np.float64(0.7391), "best_iteration": 250}


def test_paper_format_round_trip(tmp_path):
    torch.manual_seed(0)
    model = SegNet(**TINY)
    state = paper_state(model)
    path = tmp_path / "ckpt" / "model_best.pth"
    save_checkpoint(path, state)
    assert os.listdir(path.parent) == ["model_best.pth"]  # no .tmp left behind

    ckpt = load_checkpoint(path)
    assert type(ckpt["best_performance"]) is np.float64 and ckpt["best_performance"] == state["best_performance"]
    assert (ckpt["epoch"], ckpt["iteration"], ckpt["best_iteration"]) == (3, 300, 250)
    momentum = state["opt"]["state"][0]["momentum_buffer"]
    assert torch.equal(ckpt["opt"]["state"][0]["momentum_buffer"], momentum)

    fresh = SegNet(**TINY)
    load_model_state(fresh, checkpoint_state_dict(ckpt), path)
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k


def test_numpy1_named_scalar_loads(tmp_path):
    """Checkpoints written under NumPy 1.x name the scalar constructor `numpy.core.multiarray`."""
    buf = io.BytesIO()
    torch.save({"state_dict": {"w": torch.arange(3.0)}, "best_performance": np.float64(0.25)}, buf)
    src, out = zipfile.ZipFile(io.BytesIO(buf.getvalue())), io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for name in src.namelist():
            data = src.read(name)
            if name.endswith("data.pkl"):
                assert b"numpy._core.multiarray\nscalar" in data
                data = data.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
            dst.writestr(name, data)
    path = tmp_path / "np1.pth"
    path.write_bytes(out.getvalue())
    ckpt = load_checkpoint(path)
    assert type(ckpt["best_performance"]) is np.float64 and ckpt["best_performance"] == 0.25


@pytest.mark.parametrize("make, name", [
    (lambda tmp: {"x": Custom()}, "Custom"),
    (lambda tmp: {"state_dict": {}, "x": Payload(str(tmp / "pwned"))}, "mkdir"),
    (lambda tmp: {"best_performance": np.float32(0.5)}, "Float32DType"),  # only float64 is allowed
    (lambda tmp: {"arr": np.zeros(3)}, "_reconstruct"),
])
def test_unsafe_pickles_are_refused(tmp_path, make, name):
    path = tmp_path / "evil.pth"
    torch.save(make(tmp_path), path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: refused: holds objects other than tensors (") and name in msg
    assert not (tmp_path / "pwned").exists()  # nothing was executed


def test_legacy_format_unsafe_pickle_refused(tmp_path):
    path = tmp_path / "legacy.pth"
    with open(path, "wb") as f:
        torch.save({"x": Payload(str(tmp_path / "pwned"))}, f, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="refused: holds objects other than tensors"):
        load_checkpoint(path)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("content", ["truncated", "random", "empty", "text"])
def test_corrupt_files_are_named(tmp_path, content):
    good = tmp_path / "good.pth"
    save_checkpoint(good, {"state_dict": {"w": torch.ones(100)}, "best_performance": np.float64(0.5)})
    data = {"truncated": good.read_bytes()[:300], "random": np.random.default_rng(0).bytes(2000),
            "empty": b"", "text": b"not a checkpoint\n"}[content]
    path = tmp_path / f"{content}.pth"
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match="corrupt or not a PyTorch checkpoint") as err:
        load_checkpoint(path)
    assert str(path) in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_checkpoint(tmp_path / "nope.pth")


def test_failed_save_keeps_old_file(tmp_path):
    path = tmp_path / "last.pth"
    save_checkpoint(path, {"epoch": 1})
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        save_checkpoint(path, {"epoch": 2, "bad": lambda: None})  # lambdas cannot be pickled
    assert load_checkpoint(path) == {"epoch": 1}
    assert os.listdir(tmp_path) == ["last.pth"]
    save_checkpoint(path, {"epoch": 3})  # overwriting works
    assert load_checkpoint(path) == {"epoch": 3}


def test_state_dict_mismatch_lists_keys_and_shapes():
    model = SegNet(**TINY)
    sd = dict(model.state_dict())
    del sd["classifier.bias"]
    sd["extra.weight"] = torch.zeros(1)
    sd["classifier.weight"] = torch.zeros(2, 8, 1, 1)
    with pytest.raises(ValueError) as err:
        load_model_state(model, sd, path="runs/x/model_best.pth")
    msg = str(err.value)
    assert "runs/x/model_best.pth" in msg
    assert "1 missing keys: ['classifier.bias']" in msg
    assert "1 unexpected keys: ['extra.weight']" in msg
    assert "classifier.weight: checkpoint (2, 8, 1, 1) vs model (1, 8, 1, 1)" in msg


def test_mismatch_lists_only_first_ten():
    model = SegNet(**TINY)
    keys = list(model.state_dict())
    with pytest.raises(ValueError) as err:
        load_model_state(model, {"head.0.weight": model.state_dict()["head.0.weight"]})
    msg = str(err.value)
    assert f"{len(keys) - 1} missing keys" in msg and f"(+{len(keys) - 11} more)" in msg
    assert keys[0] in msg and keys[-1] not in msg


def test_ddp_prefix_is_stripped():
    torch.manual_seed(1)
    src, dst = SegNet(**TINY), SegNet(**TINY)
    load_model_state(dst, {f"module.{k}": v for k, v in src.state_dict().items()})
    assert all(torch.equal(v, src.state_dict()[k]) for k, v in dst.state_dict().items())


def test_checkpoint_state_dict_formats():
    sd = {"w": torch.ones(2)}
    assert checkpoint_state_dict({"state_dict": sd, "epoch": 1}) is sd
    assert checkpoint_state_dict(sd) is sd
    with pytest.raises(CheckpointError, match=r"^x.pth: holds no model state dict.*\['epoch', 'opt'\]"):
        checkpoint_state_dict({"epoch": 1, "opt": {}}, "x.pth")


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("content, kind", [([torch.ones(2)], "list"), (torch.ones(3), "Tensor"),
                                           ((1, 2), "tuple"), (3, "int")])
def test_a_file_that_is_not_a_dict_is_named(tmp_path, content, kind):
    path = tmp_path / "weird.pth"
    torch.save(content, path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert str(err.value).startswith(f"{path}: holds a {kind}, not a checkpoint (expected a dict")


def payload_file(path: Path, protocol: int, zipped: bool, target: Path) -> Path:
    """A pickle of protocol `protocol` whose unpickling would create `target` (raw, or in torch's zip format)."""
    obj = {"state_dict": {"w": torch.ones(2)}, "x": Payload(str(target))}
    if zipped:
        torch.save(obj, path, pickle_protocol=protocol)
    else:
        with open(path, "wb") as f:
            pickle.dump(obj, f, protocol=protocol)
    return path


@pytest.mark.parametrize("protocol, zipped", [(p, False) for p in range(6)] + [(2, True), (4, True), (5, True)])
def test_code_payload_of_any_protocol_is_refused_not_corrupt(tmp_path, protocol, zipped):
    """Protocol >= 4 stops torch's safe unpickler at its first FRAME opcode, before it sees any global: the
    opcodes are read statically to name what the file holds. No torch warning escapes."""
    path = payload_file(tmp_path / "evil.pth", protocol, zipped, tmp_path / "pwned")
    before = digest(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning would fail the test
        with pytest.raises(CheckpointError) as err:
            load_checkpoint(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: refused: holds objects other than tensors (") and "posix.mkdir" in msg
    assert not (tmp_path / "pwned").exists() and digest(path) == before


def test_safe_protocol_4_file_is_explained(tmp_path):
    """Only allowed globals inside (tensors of two storage types, an OrderedDict, a NumPy float64): the opcodes
    are read right, so the file is not called unsafe, and the message says what to do."""
    path = tmp_path / "p4.pth"
    sd = OrderedDict(w=torch.ones(2), h=torch.ones(2, dtype=torch.bfloat16))
    torch.save({"state_dict": sd, "best_performance": np.float64(0.5)}, path, pickle_protocol=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(CheckpointError, match="written with pickle protocol 4 or later") as err:
            load_checkpoint(path)
    assert str(err.value).startswith(str(path))


def recorded(**overrides) -> dict:
    args = {"method": "gaze_sup", "num_levels": 2, "in_channels": 3, "features": [8, 8, 16, 16, 32, 8],
            "feat_dim": 8, "spatial_size": 32, "lr": 0.01}
    return {**args, **overrides}


@pytest.mark.parametrize("key, value", [("num_levels", 0), ("num_levels", "2"), ("features", [8, 8, 16]),
                                        ("feat_dim", -1), ("in_channels", None), ("method", "semi"),
                                        ("spatial_size", 0)])
def test_recorded_flags_that_build_no_model_are_named(tmp_path, key, value):
    path = tmp_path / "bad_args.pth"
    save_checkpoint(path, {"state_dict": {"w": torch.ones(2)}, "args": recorded(**{key: value})})
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert str(err.value).startswith(f"{path}: the recorded flag {key} is {value!r}, expected ")


def test_full_sup_checkpoints_may_record_any_num_levels(tmp_path):
    path = tmp_path / "full.pth"
    save_checkpoint(path, {"state_dict": {"w": torch.ones(2)}, "args": recorded(method="full_sup", num_levels=0)})
    assert load_checkpoint(path)["args"]["num_levels"] == 0


@pytest.mark.parametrize("value, kind", [(float("nan"), "NaN"), (float("inf"), "inf"), (-float("inf"), "inf")])
def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path, value, kind):
    model = SegNet(**TINY)
    sd = dict(model.state_dict())
    key = "encoder.down_2.convs.conv_1.conv.weight"
    sd[key] = sd[key].clone()
    sd[key][0, 0, 0, 0] = value  # one element is enough
    path = tmp_path / "diverged.pth"
    save_checkpoint(path, {"state_dict": sd})
    ckpt = load_checkpoint(path)
    for where in (path, None):
        with pytest.raises(CheckpointError) as err:
            checkpoint_state_dict(ckpt, where)
        prefix = f"{path}: " if where else ""
        assert str(err.value).startswith(f"{prefix}refused: the weights are not finite (1 of {len(sd)} tensors; "
                                         f"{key!r} holds {kind})")
    with pytest.raises(CheckpointError, match="not finite"):  # a bare state dict too
        checkpoint_state_dict(sd)
    sd[key][0, 0, 0, 0] = 0.0
    assert checkpoint_state_dict({"state_dict": sd}) is sd


def age(path: Path, seconds: float) -> Path:
    t = time.time() - seconds
    os.utime(path, (t, t))
    return path


def test_stale_temporaries_are_removed_by_the_next_save(tmp_path):
    """A save killed after writing part of model_ite5.pth.tmp leaves it behind; the next save in the folder
    removes it. Temporaries being written (locked) or just created are kept, other files too; a load deletes
    nothing (it may read from a folder that is not a run folder)."""
    def old_file(name: str, data: bytes) -> Path:
        path = tmp_path / name
        path.write_bytes(data)
        return age(path, 60)

    stale, busy, other = (old_file("model_ite5.pth.tmp", b"x" * 1000), old_file("model_best.pth.tmp", b"z"),
                          old_file("notes.tmp", b"mine"))
    young = tmp_path / "model_latest.pth.tmp"
    young.write_bytes(b"y")
    with open(busy, "rb") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)  # as a save in progress holds it
        save_checkpoint(tmp_path / "model_ite10.pth", {"epoch": 1})
        assert not stale.exists() and young.exists() and busy.exists() and other.read_bytes() == b"mine"
    assert load_checkpoint(tmp_path / "model_ite10.pth") == {"epoch": 1}
    assert young.exists() and busy.exists()  # a load removes nothing
    age(young, 60)
    assert remove_stale_temporaries(tmp_path) == [busy, young]  # busy: unlocked and old now
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_ite10.pth", "notes.tmp"]


def test_a_save_in_progress_holds_its_temporary(tmp_path):
    """While save_checkpoint writes, its temporary is locked: a cleanup run from inside the write (even with the
    temporary aged past the threshold) keeps it, and the save completes. A killed writer's lock is released by
    the kernel, which is the case the test above covers with a lock released by hand."""
    tmp = tmp_path / "model_latest.pth.tmp"
    seen = {}

    class Probe:
        def __reduce__(self):  # runs inside torch.save, with the temporary open for writing
            age(tmp, 60)
            seen["removed"] = remove_stale_temporaries(tmp_path)
            seen["exists"] = tmp.exists()
            return (int, (7,))

    save_checkpoint(tmp_path / "model_latest.pth", {"w": torch.ones(3), "probe": Probe()})
    assert seen == {"removed": [], "exists": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_latest.pth"]
