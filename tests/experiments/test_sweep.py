"""`run.py sweep`: 2 tiny presets x 2 seeds on synthetic data, interrupted after the first run's first
checkpoint and run again: every run finishes exactly once, in one folder, and a third sweep starts nothing."""
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from common.errors import UserError
from experiments import summarize, sweep
from tests.helpers import tiny_dataset

REPO = Path(__file__).resolve().parents[2]
MAX_ITE = 16


def tiny_preset(path: Path, name: str, cons_mode: str) -> Path:
    """A seconds-long preset: narrow 2-level model, 32 px, evaluation (and model_latest.pth) every 4 iterations."""
    path.write_text(yaml.safe_dump({
        "run_name": name, "method": "gaze_sup", "data": "kvasir", "num_levels": 2, "cons_mode": cons_mode,
        "features": [8, 8, 16, 16, 32, 8], "feat_dim": 8, "spatial_size": 32, "batch_size": 4, "opt": "adam",
        "lr": 1e-3, "max_ite": MAX_ITE, "val_step": 4, "log_step": 4, "save_step": 1000, "num_worker": 0}))
    return path


def run_dirs(exp: Path) -> dict:
    """(run_name, seed) -> its run folders."""
    out = {}
    for cfg in sorted(exp.glob("*/kvasir/*/config.yaml")):
        c = yaml.safe_load(cfg.read_text())
        out.setdefault((c["run_name"], c["seed"]), []).append(cfg.parent)
    return out


def wait_for(predicate, proc, seconds: float):
    end = time.time() + seconds
    while time.time() < end:
        found = predicate()
        if found:
            return found
        assert proc.poll() is None, proc.communicate()[0]
        time.sleep(0.02)
    raise AssertionError("timed out")


def test_sweep_interrupted_and_rerun_finishes_each_run_once(tmp_path, capsys):
    root = tiny_dataset(tmp_path / "data")
    presets = [tiny_preset(tmp_path / "a.yaml", "tinyA", "prop"), tiny_preset(tmp_path / "b.yaml", "tinyB", "pure")]
    exp = tmp_path / "exp"
    argv = ["--presets", *map(str, presets), "--seeds", "0,1", "--root", str(root), "--exp_path", str(exp)]
    env = dict(os.environ, OMP_NUM_THREADS="1")

    # 1. a sweep, stopped with SIGTERM once its first run (tinyA, seed 0) has saved a checkpoint
    proc = subprocess.Popen([sys.executable, "-m", "experiments.sweep", *argv], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: list(exp.glob("0/kvasir/tinyA_*/model_latest.pth")), proc, 240)
        log = (exp / "sweep_logs" / "kvasir" / "tinyA_seed0.log").read_text()
        child = int(re.findall(r"=== pid (\d+)", log)[-1])
        os.kill(child, signal.SIGSTOP)  # hold the child so that it cannot finish before the signal lands
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        os.kill(child, signal.SIGCONT)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, out
    assert "not started" in out
    first = run_dirs(exp)
    assert list(first) == [("tinyA", 0)], first  # no other run started after the signal
    interrupted = first[("tinyA", 0)][0]
    assert (interrupted / "model_latest.pth").exists() and not (interrupted / "metrics.json").exists()
    assert sweep.plan(exp, sweep.make_jobs([presets[0]], [0], {None: str(root)})[0]) == ("resume", interrupted)

    # 2. the same sweep again (two slots): resumes tinyA/0 in its folder, runs the other three
    assert sweep.main(argv + ["--gpus", "0,1"]) == 0, capsys.readouterr().out
    second = run_dirs(exp)
    assert sorted(second) == [("tinyA", 0), ("tinyA", 1), ("tinyB", 0), ("tinyB", 1)]
    # depends on `run.py --resume --ckpt_path RUN` continuing in RUN (helper A): one folder per run
    assert all(len(folders) == 1 for folders in second.values()), second
    assert second[("tinyA", 0)] == [interrupted]
    for (folder,) in second.values():
        m = json.loads((folder / "metrics.json").read_text())
        assert m["final_iteration"] == MAX_ITE, folder
    iterations = [int(line.split(",")[0]) for line in (interrupted / "losses.csv").read_text().splitlines()[1:]]
    assert iterations == sorted(set(iterations)) and iterations[-1] == MAX_ITE  # no iteration trained twice

    # 3. a third time: everything is finished, nothing starts and no file changes
    stamps = {p: p.stat().st_mtime_ns for p in exp.rglob("*") if p.is_file() and "sweep_logs" not in p.parts}
    capsys.readouterr()
    assert sweep.main(argv) == 0
    assert capsys.readouterr().out.count("skipped") == 4
    assert stamps == {p: p.stat().st_mtime_ns for p in exp.rglob("*") if p.is_file() and "sweep_logs" not in p.parts}

    # the summary of these runs equals a direct computation from their metrics.json
    rows, _ = summarize.summarize(exp, plot=False)
    for row in rows:
        dice = [100 * json.loads((f / "metrics.json").read_text())["final"]["mdice"]
                for (name, _), (f,) in second.items() if name == row["preset"]]
        assert row["n"] == 2
        assert row["final_dice_mean"] == pytest.approx(statistics.mean(dice), abs=1e-9)
        assert row["final_dice_std"] == pytest.approx(statistics.stdev(dice), abs=1e-9)


def test_dry_run_plans_without_running(tmp_path, capsys):
    preset = tiny_preset(tmp_path / "a.yaml", "tinyA", "prop")
    exp = tmp_path / "exp"
    done = exp / "1" / "kvasir" / "tinyA_20260101-000000"
    done.mkdir(parents=True)
    (done / "config.yaml").write_text(yaml.safe_dump({"run_name": "tinyA", "seed": 1, "max_ite": MAX_ITE}))
    (done / "metrics.json").write_text(json.dumps({"final_iteration": MAX_ITE, "final": {"mdice": 0.5}}))
    stopped = exp / "2" / "kvasir" / "tinyA_20260101-000000"
    stopped.mkdir(parents=True)
    (stopped / "config.yaml").write_text(yaml.safe_dump({"run_name": "tinyA", "seed": 2, "max_ite": MAX_ITE}))
    (stopped / "model_latest.pth").write_bytes(b"")
    assert sweep.main(["--presets", str(preset), "--seeds", "0,1,2", "--root", "R", "--exp_path", str(exp),
                       "--dry_run", "--gpus", "3", "--", "--num_worker", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("kvasir/tinyA seed 0: start ")
    assert out[0].endswith(f"--config {preset} --seed 0 --exp_path {exp} --quiet --root R --device 0 --num_worker 2")
    assert out[1] == f"kvasir/tinyA seed 1: skip {done}"
    assert out[2].endswith(f"run.py --resume --ckpt_path {stopped} --root R --device 0")  # its own recorded flags
    assert not (exp / "0").exists()


@pytest.mark.parametrize("argv, match", [
    (["--presets", "no_such_preset"], "no preset named 'no_such_preset'"),
    (["--presets", "kvasir_gazesup", "--seeds", "0,x"], "--seeds '0,x'"),
    (["--presets", "kvasir_gazesup", "prostate_gazesup", "--root", "kvasir=K"], "--root is missing for prostate"),
    (["--seeds", "0"], "--presets"),
    (["--presets", "kvasir_gazesup", "--root", "K", "--", "--seed", "3"], "must not set --seed"),
])
def test_user_errors(argv, match, tmp_path):
    with pytest.raises(UserError, match=re.escape(match)):
        sweep.main(["--exp_path", str(tmp_path / "exp"), *argv])
    assert not (tmp_path / "exp").exists()


def test_presets_by_name_and_pattern():
    names = [p.stem for p in sweep.resolve_presets(["kvasir_box*", "kvasir_gazesup", "kvasir_box"])]
    assert names == ["kvasir_box", "kvasir_box_crf", "kvasir_gazesup"]


def test_one_sweep_per_exp(tmp_path, capsys):
    """A live sweep's lock refuses a second sweep; a stale lock (its process is gone) is taken over."""
    import socket

    preset = tiny_preset(tmp_path / "a.yaml", "tinyA", "prop")
    exp = tmp_path / "exp"
    done = exp / "0" / "kvasir" / "tinyA_20260101-000000"
    done.mkdir(parents=True)
    (done / "config.yaml").write_text(yaml.safe_dump({"run_name": "tinyA", "seed": 0, "max_ite": MAX_ITE}))
    (done / "metrics.json").write_text(json.dumps({"final_iteration": MAX_ITE, "final": {"mdice": 0.5}}))
    argv = ["--presets", str(preset), "--seeds", "0", "--root", "R", "--exp_path", str(exp)]
    lock = exp / ".sweep.lock"
    lock.write_text(f"{socket.gethostname()} {os.getppid()}")  # a live process
    with pytest.raises(UserError, match="another sweep"):
        sweep.main(argv)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(f"{socket.gethostname()} {dead.pid}")
    assert sweep.main(argv) == 0  # everything finished: nothing starts
    assert "skipped" in capsys.readouterr().out and not lock.exists()
