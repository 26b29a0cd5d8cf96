"""Checkpoint I/O: the paper's format round-trips, unsafe or corrupt files are refused with the
file named, and mismatched state dicts are listed."""
import io
import os
import zipfile

import numpy as np
import pytest
import torch
import torch.nn as nn

from models import (CheckpointError, SegNet, checkpoint_state_dict, load_checkpoint, load_model_state,
                    save_checkpoint)

TINY = dict(features=(8, 8, 16, 16, 32, 8), feat_dim=8)


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
    assert str(path) in msg and "not allowed" in msg and "refusing to unpickle" in msg and name in msg
    assert not (tmp_path / "pwned").exists()  # nothing was executed


def test_legacy_format_unsafe_pickle_refused(tmp_path):
    path = tmp_path / "legacy.pth"
    with open(path, "wb") as f:
        torch.save({"x": Payload(str(tmp_path / "pwned"))}, f, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
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
    with pytest.raises(Exception):
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
    with pytest.raises(ValueError, match=r"no model state dict.*\['epoch', 'opt'\]"):
        checkpoint_state_dict({"epoch": 1, "opt": {}})
