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


def fake_root(path: Path) -> Path:
    """The prepared layout a gaze_sup run needs (the sweep checks it before starting; nothing is trained)."""
    for sub in ("images", "gaze/crf_compat1"):
        (path / sub).mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        (path / f"{split}.txt").write_text("a\n")
    return path


def recorded_run(exp: Path, preset: Path, seed: int, root: Path, finished: bool = True, extra=(), **changed) -> Path:
    """A run folder of `preset` at `seed` recording exactly what run.py would record (with `changed` settings)."""
    from engine.run_folder import recorded_settings, save_config
    job = sweep.make_jobs([preset], [seed], {None: str(root)})[0]
    settings = sweep.child_settings(exp, job, list(extra))
    for k, v in changed.items():
        setattr(settings, k, v)
    folder = exp / str(seed) / "kvasir" / f"{job.run_name}_20260101-000000"
    folder.mkdir(parents=True)
    save_config(settings, folder)
    assert "resume" not in recorded_settings(settings)
    if finished:
        (folder / "metrics.json").write_text(json.dumps({"final_iteration": settings.max_ite,
                                                         "final": {"mdice": 0.5}}))
    else:
        (folder / "model_latest.pth").write_bytes(b"")
    return folder


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


@pytest.mark.slow
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
    job = sweep.make_jobs([presets[0]], [0], {None: str(root)})[0]
    sweep.preflight(exp, [job], {None: str(root)}, [])
    assert sweep.plan(exp, job) == ("resume", interrupted)

    # 2. the same sweep again: resumes tinyA/0 in its folder, runs the other three
    assert sweep.main(argv) == 0, capsys.readouterr().out
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
    exp, root = tmp_path / "exp", fake_root(tmp_path / "R")
    extra = ["--", "--num_worker", "2"]
    done = recorded_run(exp, preset, 1, root, extra=extra[1:])
    stopped = recorded_run(exp, preset, 2, root, finished=False, extra=extra[1:])
    assert sweep.main(["--presets", str(preset), "--seeds", "0,1,2", "--root", str(root), "--exp_path", str(exp),
                       "--dry_run", *extra]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("kvasir/tinyA seed 0: start ")
    assert out[0].endswith(f"--config {preset} --seed 0 --exp_path {exp} --quiet --root {root} --num_worker 2")
    assert out[1] == f"kvasir/tinyA seed 1: skip {done}"
    assert out[2].endswith(f"run.py --resume --ckpt_path {stopped} --root {root}")  # its own recorded flags
    assert not (exp / "0").exists()


def test_a_run_with_other_settings_is_another_run(tmp_path, capsys):
    """A smoke-test run of a preset (fewer iterations, smaller images) is not the preset's run: the sweep says how
    it differs and starts a new run instead of skipping or resuming it; a change that cannot alter results (the
    number of workers, the log step) is the same run."""
    preset = tiny_preset(tmp_path / "a.yaml", "tinyA", "prop")
    exp, root = tmp_path / "exp", fake_root(tmp_path / "R")
    smoke = recorded_run(exp, preset, 0, root, max_ite=4, spatial_size=16)
    argv = ["--presets", str(preset), "--seeds", "0", "--root", str(root), "--exp_path", str(exp), "--dry_run"]
    assert sweep.main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == (f"kvasir/tinyA seed 0: {smoke} has the same name but other settings (max_ite 4 vs {MAX_ITE}; "
                      "spatial_size 16 vs 32): not this run")
    assert out[1].startswith("kvasir/tinyA seed 0: start ")
    # unfinished with other settings: not resumed either
    (smoke / "metrics.json").unlink()
    (smoke / "model_latest.pth").write_bytes(b"")
    assert sweep.main(argv) == 0
    assert capsys.readouterr().out.splitlines()[1].startswith("kvasir/tinyA seed 0: start ")
    # a run differing only in flags that cannot change results is the preset's run
    same = recorded_run(exp, preset, 1, root, num_worker=3, log_step=1, device="cpu")
    assert sweep.main(argv[:2] + ["--seeds", "1"] + argv[4:]) == 0
    assert capsys.readouterr().out.splitlines() == [f"kvasir/tinyA seed 1: skip {same}"]


def test_problems_are_found_before_anything_starts(tmp_path, capsys):
    """A missing root, a root without the prepared layout, a preset key run.py does not know and a --root NAME
    that is no dataset of the presets: one line each, exit status 2, nothing started or created."""
    import run
    good = tiny_preset(tmp_path / "a.yaml", "tinyA", "prop")
    bad = tmp_path / "b.yaml"
    bad.write_text(yaml.safe_dump({"run_name": "tinyB", "data": "kvasir", "max_itr": 5}))
    exp = tmp_path / "exp"
    argv = ["sweep", "--presets", str(good), str(bad), "--seeds", "0,1", "--exp_path", str(exp)]
    assert run.cli(argv + ["--root", str(tmp_path / "nowhere"), "--root", f"prostat={tmp_path}"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and all(line.startswith("error: ") for line in err), err
    assert "--root prostat=" in err[0] and "no preset of this sweep is on dataset 'prostat'" in err[0]
    assert any("unknown key(s) ['max_itr']" in line and str(bad) in line for line in err), err
    assert any(f"--root {tmp_path / 'nowhere'} is not a folder" in line for line in err), err
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "images").mkdir()
    assert run.cli(["sweep", "--presets", str(good), "--root", str(tmp_path / "half"), "--exp_path", str(exp)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "lacks train.txt, test.txt, gaze/crf_compat1" in err[0], err
    assert not exp.exists()


def test_gpus_that_are_not_visible_are_refused(tmp_path, capsys):
    import run
    preset = tiny_preset(tmp_path / "a.yaml", "tinyA", "prop")
    exp = tmp_path / "exp"
    assert run.cli(["sweep", "--presets", str(preset), "--root", str(fake_root(tmp_path / "R")),
                    "--exp_path", str(exp), "--gpus", "0,97"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: --gpus 0,97: GPU ") and "97, not visible" not in err[0]
    assert "not visible" in err[0]
    assert not exp.exists()


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
    root = fake_root(tmp_path / "R")
    recorded_run(exp, preset, 0, root)
    argv = ["--presets", str(preset), "--seeds", "0", "--root", str(root), "--exp_path", str(exp)]
    lock = exp / ".sweep.lock"
    lock.write_text(f"{socket.gethostname()} {os.getppid()}")  # a live process
    with pytest.raises(UserError, match="another sweep"):
        sweep.main(argv)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(f"{socket.gethostname()} {dead.pid}")
    assert sweep.main(argv) == 0  # everything finished: nothing starts
    assert "skipped" in capsys.readouterr().out and not lock.exists()
