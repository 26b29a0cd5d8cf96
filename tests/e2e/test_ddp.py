"""Data parallelism on CPU (gloo, 2 processes under torchrun): both ranks end with bit-identical weights,
equal within float tolerance to one process training on the combined batch; evaluation gathers the whole
test split; only rank 0 writes files (one run folder, one event file, --save_pred for every image)."""
import csv
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import run
from models.checkpoint import checkpoint_state_dict, load_checkpoint
from tests.helpers import only_run_dir, tiny_argv, tiny_dataset

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("one_thread")
STEPS = ["--max_ite", "4", "--val_step", "2", "--save_step", "2", "--log_step", "1", "--quiet", "--save_pred"]


def sha256_of(state_dict: dict) -> str:
    """The digest Trainer records per rank, recomputed here from the saved checkpoint (float32 tensors)."""
    h = hashlib.sha256()
    for k, v in state_dict.items():
        h.update(k.encode())
        h.update(v.contiguous().numpy().tobytes())
    return h.hexdigest()


def losses(run_dir: Path) -> list:
    with open(run_dir / "losses.csv") as f:
        return [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    data = tiny_dataset(tmp_path_factory.mktemp("data"), num_train=8, num_test=5)
    exp_ddp, exp_one = tmp_path_factory.mktemp("ddp"), tmp_path_factory.mktemp("one")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "run.py",
           *tiny_argv(data, exp_ddp, *STEPS)]
    cmd[cmd.index("-bs") + 1] = "2"  # per process: the global batch is 4
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert run.main(tiny_argv(data, exp_one, *STEPS)) == 0  # one process, batch 4
    return {"data": data, "ddp": only_run_dir(exp_ddp), "one": only_run_dir(exp_one)}


@pytest.mark.slow
def test_ranks_hold_identical_weights(runs):
    metrics = json.loads((runs["ddp"] / "metrics.json").read_text())
    digests = metrics["weights_sha256_per_rank"]
    saved = checkpoint_state_dict(load_checkpoint(runs["ddp"] / "model_latest.pth"))
    assert len(digests) == 2 and digests[0] == digests[1] == sha256_of(saved)


def test_ddp_equals_one_process_on_the_combined_batch(runs):
    for name in ("model_ite2.pth", "model_ite4.pth"):
        ddp, one = (checkpoint_state_dict(load_checkpoint(runs[k] / name)) for k in ("ddp", "one"))
        for k, v in one.items():
            torch.testing.assert_close(ddp[k], v, rtol=1e-4, atol=1e-6, msg=f"{name}: {k}")
    # the logged loss is the global batch's: the ranks' means averaged = the one-process mean
    a, b = losses(runs["ddp"]), losses(runs["one"])
    assert [r["iteration"] for r in a] == [r["iteration"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        for key in rb:
            assert ra[key] == pytest.approx(rb[key], rel=1e-5, abs=1e-6), key


def test_weights_changed_during_training(runs):
    """Guards the comparison above: steps 3-4 moved the weights far more than its tolerance."""
    ite2, ite4 = (checkpoint_state_dict(load_checkpoint(runs["ddp"] / n)) for n in ("model_ite2.pth", "model_ite4.pth"))
    assert max((ite4[k] - v).abs().max().item() for k, v in ite2.items()) > 1e-3


def test_metrics_gathered_over_the_whole_test_split(runs):
    test_ids = (runs["data"] / "test.txt").read_text().split()
    metrics = json.loads((runs["ddp"] / "metrics.json").read_text())
    assert metrics["final"]["num_images"] == len(test_ids) == 5  # 3 on rank 0, 2 on rank 1
    with open(runs["ddp"] / "per_image_metrics.csv") as f:
        assert sorted(r["id"] for r in csv.DictReader(f)) == sorted(test_ids)
    for folder in ("pred", "pred_1", "pred_2"):
        assert sorted(p.stem for p in (runs["ddp"] / "predictions" / folder).glob("*.png")) == sorted(test_ids)


def test_only_rank_zero_writes(runs):
    assert len(list(runs["ddp"].glob("events.out.tfevents.*"))) == 1  # only_run_dir checked: one run folder

    def names(run_dir):
        return sorted("events" if p.name.startswith("events.") else p.name for p in run_dir.rglob("*"))
    assert names(runs["ddp"]) == names(runs["one"])
