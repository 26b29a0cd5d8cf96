"""`run.py sweep --launcher slurm`.

Without daemons: the flags, the bad-input errors, --dry_run, --status, and one run through submitit's
LocalExecutor that is told its time is up (SIGUSR2, as Slurm does before a time limit): it saves, is requeued,
resumes, and ends with the losses.csv of an uninterrupted run.
With a Slurm cluster (`scripts/slurm_local.sh start`; marked `slurm`, skipped when none is up): 2 tiny presets x 2
seeds as a job array, one task cancelled with scancel while training and resumed by the same command, a third
command that submits nothing."""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from common.errors import UserError
from experiments import slurm, sweep
from tests.experiments.test_sweep import MAX_ITE, fake_root, recorded_run, run_dirs, tiny_preset
from tests.helpers import tiny_dataset

REPO = Path(__file__).resolve().parents[2]


def slurm_missing() -> str | None:
    """Why the real-Slurm test cannot run here, or None."""
    if shutil.which("sbatch") is None:
        return "no sbatch on PATH (start a one-node cluster: scripts/slurm_local.sh start, then export SLURM_CONF)"
    try:
        done = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"sinfo failed: {e}"
    states = done.stdout.split()
    if done.returncode != 0 or not any(s.rstrip("*~#") in ("idle", "mixed", "allocated") for s in states):
        return f"the Slurm cluster is not up (sinfo: {' '.join((done.stderr + done.stdout).split()) or 'no nodes'})"
    return None


def sweep_argv(presets, root: Path, exp: Path, *more: str) -> list[str]:
    return ["--presets", *map(str, presets), "--seeds", "0,1", "--root", str(root), "--exp_path", str(exp), *more]


def uninterrupted(preset: Path, root: Path, exp: Path) -> subprocess.Popen:
    """The same run as the sweep starts it, straight through (its losses.csv is the reference)."""
    return subprocess.Popen([sys.executable, str(REPO / "run.py"), "--config", str(preset), "--seed", "0",
                             "--exp_path", str(exp), "--quiet", "--root", str(root)], cwd=REPO,
                            env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT)


# ---------------------------------------------------------------- no daemons


@pytest.mark.parametrize("text, minutes", [("90", 90), ("1:30", 2), ("2:00:00", 120), ("1-00:00:00", 1440),
                                           ("1-2", 1560), ("0:0:1", 1), ("UNLIMITED", 365 * 24 * 60)])
def test_slurm_time_in_minutes(text, minutes):
    assert slurm.time_minutes(text) == minutes


def test_dry_run_prints_the_array_and_submits_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no Slurm here: a dry run still shows the plan
    a = tiny_preset(tmp_path / "a.yaml", "tinyA", "prop")
    exp, root = tmp_path / "exp", fake_root(tmp_path / "R")
    done = recorded_run(exp, a, 1, root, extra=["--num_worker", "2"])
    argv = ["--presets", str(a), "--seeds", "0,1,2", "--root", str(root), "--exp_path", str(exp), "--launcher", "slurm",
            "--max_parallel", "1", "--slurm_partition", "gpu", "--slurm_time", "1-00:00:00", "--slurm_mem", "32G",
            "--slurm_gpus_per_task", "1", "--slurm_cpus_per_task", "8", "--slurm_account", "lab",
            "--slurm_qos", "normal", "--sbatch", "constraint=a100", "--sbatch", "exclusive", "--dry_run",
            "--", "--num_worker", "2"]
    assert sweep.main(argv) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == f"kvasir/tinyA seed 1: finished in {done}: skipped"
    assert lines[1].startswith("kvasir/tinyA seed 0: array task 0: start ")
    assert lines[1].endswith(f"--seed 0 --exp_path {exp.resolve()} --quiet --root {root} --num_worker 2")
    assert lines[2].startswith("kvasir/tinyA seed 2: array task 1: start ")
    script = out[out.index("#!/bin/bash"):]
    for option in ("--array=0-1%1", "--partition=gpu", "--time=1440", "--mem=32G", "--gpus-per-task=1",
                   "--cpus-per-task=8", "--account=lab", "--qos=normal", "--constraint=a100", "--exclusive",
                   "--signal=USR2@120"):
        assert f"#SBATCH {option}\n" in script, option
    assert f"--output={exp.resolve()}/sweep_logs/slurm/%A_%a_0_log.out" in script
    assert not (exp / "0").exists() and not (exp / "sweep_logs").exists()


def test_a_run_with_other_settings_is_not_submitted_as_the_presets(tmp_path, capsys, monkeypatch):
    """The Slurm launcher uses the local sweep's identity: a finished smoke-test run of the preset (fewer
    iterations, smaller images) is neither skipped as the preset's run nor resumed; its task starts a new run."""
    monkeypatch.setenv("PATH", str(tmp_path))
    a = tiny_preset(tmp_path / "a.yaml", "tinyA", "prop")
    exp, root = tmp_path / "exp", fake_root(tmp_path / "R")
    smoke = recorded_run(exp, a, 0, root, max_ite=4, spatial_size=16)
    assert sweep.main(["--presets", str(a), "--seeds", "0", "--root", str(root), "--exp_path", str(exp),
                       "--launcher", "slurm", "--dry_run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == (f"kvasir/tinyA seed 0: {smoke} has the same name but other settings (max_ite 4 vs "
                        f"{MAX_ITE}; spatial_size 16 vs 32): not this run")
    assert lines[1].startswith("kvasir/tinyA seed 0: array task 0: start ")


def test_problems_are_found_before_anything_is_submitted(tmp_path, capsys, monkeypatch):
    """The local sweep's checks run before a Slurm submission too: a root without the prepared layout is an
    error line, nothing submitted or created."""
    import run
    monkeypatch.setenv("PATH", str(tmp_path))
    a = tiny_preset(tmp_path / "a.yaml", "tinyA", "prop")
    (tmp_path / "half").mkdir()
    assert run.cli(["sweep", "--presets", str(a), "--root", str(tmp_path / "half"), "--exp_path",
                    str(tmp_path / "exp"), "--launcher", "slurm", "--dry_run"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and f"--root {tmp_path / 'half'} lacks" in err[0], err
    assert not (tmp_path / "exp").exists()


@pytest.mark.parametrize("more, match", [
    ([], "no `sbatch` on PATH"),
    (["--gpus", "0,1"], "--gpus is for --launcher local"),
    (["--sbatch", "array=0-3"], "the sweep sets --array itself"),
    (["--sbatch", "Bad Option"], "expected an sbatch option name"),
    (["--max_parallel", "0"], "--max_parallel 0: expected a positive integer"),
    (["--slurm_time", "soon", "--dry_run"], "--slurm_time 'soon': expected a Slurm time"),
])
def test_user_errors_before_anything_is_submitted(more, match, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    a = tiny_preset(tmp_path / "a.yaml", "tinyA", "prop")
    with pytest.raises(UserError, match=re.escape(match)):
        sweep.main(["--presets", str(a), "--root", "R", "--exp_path", str(tmp_path / "exp"), "--launcher", "slurm",
                    *more])
    assert not (tmp_path / "exp").exists()


def test_slurm_flags_need_the_slurm_launcher(tmp_path):
    a = tiny_preset(tmp_path / "a.yaml", "tinyA", "prop")
    with pytest.raises(UserError, match="--max_parallel is for --launcher slurm"):
        sweep.main(["--presets", str(a), "--root", "R", "--exp_path", str(tmp_path / "exp"), "--max_parallel", "2"])


def test_status_from_run_folders_and_the_slurm_record(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no squeue: recorded runs not finished read as failed
    exp = tmp_path / "exp"
    done = exp / "0" / "kvasir" / "tinyA_20260101-000000"
    done.mkdir(parents=True)
    (done / "config.yaml").write_text(yaml.safe_dump({"run_name": "tinyA", "seed": 0, "max_ite": MAX_ITE}))
    (done / "metrics.json").write_text(json.dumps({"final_iteration": MAX_ITE, "final": {"mdice": 0.5}}))
    log = exp / "sweep_logs" / "kvasir" / "tinyB_seed0.log"
    log.parent.mkdir(parents=True)
    log.write_text("=== start\n=== pid 1\n=== exit status 130\n")
    slurm.write_record(exp, {"kvasir/tinyA/seed0": {"job_id": "7_0", "log": "x"},
                             "kvasir/tinyB/seed0": {"job_id": "7_1", "log": str(log)}})
    assert sweep.main(["--status", str(exp)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert re.match(r"kvasir/tinyA seed 0 +finished +7_0 +" + re.escape(str(done.resolve())), lines[1])
    assert re.match(r"kvasir/tinyB seed 0 +failed +7_1 +.*tinyB_seed0.log \(last exit status 130\)", lines[2])
    assert lines[-1] == "1 failed, 1 finished"


def test_local_executor_task_plans_when_it_starts(tmp_path, monkeypatch):
    """A task is planned in its own process when it starts, not when submitted: one whose run finished
    meanwhile (e.g. a requeued task after another sweep finished it) does nothing and says where the run is."""
    submitit = pytest.importorskip("submitit")
    a = tiny_preset(tmp_path / "a.yaml", "tinyA", "prop")
    exp = (tmp_path / "exp").resolve()
    job = sweep.make_jobs([a], [0], {None: "R"})[0]
    task = slurm.RunTask(exp, job, [])   # planned now: a new run
    assert sweep.plan(exp, job) == ("start", None)
    done = exp / "0" / "kvasir" / "tinyA_20260101-000000"
    done.mkdir(parents=True)
    (done / "config.yaml").write_text(yaml.safe_dump({"run_name": "tinyA", "seed": 0, "max_ite": MAX_ITE}))
    (done / "metrics.json").write_text(json.dumps({"final_iteration": MAX_ITE, "final": {"mdice": 0.5}}))
    monkeypatch.setenv("PYTHONPATH", str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    executor = submitit.LocalExecutor(folder=exp / "sweep_logs" / "slurm")
    executor.update_parameters(timeout_min=5)
    assert executor.submit(task).result() == f"finished in {done}"
    assert not task.log_path().exists()  # no run.py was started


@pytest.mark.slow
def test_local_executor_requeue_resumes_the_run(tmp_path, monkeypatch):
    """SIGUSR2 to a task (what Slurm sends before the time limit): the run saves and stops, submitit requeues the
    task, which resumes the run in its folder; losses.csv equals an uninterrupted run's, row for row."""
    submitit = pytest.importorskip("submitit")
    root = tiny_dataset(tmp_path / "data")
    a = tiny_preset(tmp_path / "a.yaml", "tinyA", "prop")
    exp = (tmp_path / "exp").resolve()
    reference = uninterrupted(a, root, tmp_path / "ref")
    executor = submitit.LocalExecutor(folder=exp / "sweep_logs" / "slurm")
    executor.update_parameters(timeout_min=60)
    monkeypatch.setenv("PYTHONPATH", str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # as the reference: another thread count rounds differently
    job = sweep.make_jobs([a], [0], {None: str(root)})[0]
    submitted, left = slurm.launch(exp, [job], [], slurm.SlurmSettings(), dry_run=False, executor=executor)
    assert [(j.label, action) for j, action, _ in submitted] == [("kvasir/tinyA seed 0", "start")] and not left
    local_job = submitted[0][2]
    log = exp / "sweep_logs" / "kvasir" / "tinyA_seed0.log"
    end = time.time() + 240
    while not list(exp.glob("0/kvasir/tinyA_*/model_latest.pth")):
        assert time.time() < end and not local_job.done(), log.read_text() if log.exists() else ""
        time.sleep(0.02)
    child = int(re.findall(r"=== pid (\d+)", log.read_text())[-1])
    os.kill(child, signal.SIGSTOP)  # the run must still be training when the signal lands
    task = int(Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[1])  # the submitit task: its parent
    for pid in (child, task):  # Slurm signals every process of the job; the run ignores SIGUSR2, the task answers
        os.kill(pid, signal.SIGUSR2)
    time.sleep(0.5)
    os.kill(child, signal.SIGCONT)
    assert local_job.result() == "finished"
    text = log.read_text()
    assert text.count("=== exit status 130; the task is requeued") == 1 and "resume in Slurm job" in text, text
    (folder,) = run_dirs(exp)[("tinyA", 0)]
    assert reference.wait(timeout=240) == 0
    (ref,) = run_dirs(tmp_path / "ref")[("tinyA", 0)]
    assert (folder / "losses.csv").read_bytes() == (ref / "losses.csv").read_bytes()
    assert json.loads((folder / "metrics.json").read_text())["final_iteration"] == MAX_ITE


# ---------------------------------------------------------------- a real Slurm cluster


@pytest.mark.slow
@pytest.mark.slurm
def test_slurm_sweep_cancel_resume_and_nothing_left(tmp_path):
    why = slurm_missing()
    if why:
        pytest.skip(why)
    root = tiny_dataset(tmp_path / "data")
    presets = [tiny_preset(tmp_path / "a.yaml", "tinyA", "prop"), tiny_preset(tmp_path / "b.yaml", "tinyB", "pure")]
    exp = (tmp_path / "exp").resolve()
    cmd = [sys.executable, str(REPO / "run.py"), "sweep",
           *sweep_argv(presets, root, exp, "--launcher", "slurm", "--max_parallel", "2", "--slurm_cpus_per_task", "1")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    reference = uninterrupted(presets[0], root, tmp_path / "ref")

    # 1. submit the four runs; cancel tinyA seed 0 once it has saved a checkpoint, while it still trains
    first = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stdout + first.stderr
    record = slurm.read_record(exp)
    assert sorted(record) == ["kvasir/tinyA/seed0", "kvasir/tinyA/seed1", "kvasir/tinyB/seed0", "kvasir/tinyB/seed1"]
    ids = [r["job_id"] for r in record.values()]
    assert len({i.split("_")[0] for i in ids}) == 1, ids  # one job array
    try:
        with pytest.raises(UserError, match="still (pending|running) in Slurm"):  # the lock across launchers
            sweep.main(sweep_argv(presets, root, exp))
        log = exp / "sweep_logs" / "kvasir" / "tinyA_seed0.log"
        end = time.time() + 240
        while not list(exp.glob("0/kvasir/tinyA_*/model_latest.pth")):
            assert time.time() < end, log.read_text() if log.exists() else "no log"
            time.sleep(0.02)
        child = int(re.findall(r"=== pid (\d+)", log.read_text())[-1])
        os.kill(child, signal.SIGSTOP)  # hold it: it must not finish before scancel's SIGTERM lands
        subprocess.run(["scancel", record["kvasir/tinyA/seed0"]["job_id"]], check=True, timeout=60)
        time.sleep(0.5)
        try:
            os.kill(child, signal.SIGCONT)
        except ProcessLookupError:
            pass
        slurm.wait(ids, poll_s=1, timeout_s=300)
    finally:
        subprocess.run(["scancel", *ids], timeout=60)  # nothing of this test stays queued if it fails
    rows = {r["key"]: r for r in slurm.status_rows(exp)}
    assert rows["kvasir/tinyA/seed0"]["state"] == "failed", rows
    assert [rows[k]["state"] for k in sorted(rows) if k != "kvasir/tinyA/seed0"] == ["finished"] * 3, rows
    (stopped,) = run_dirs(exp)[("tinyA", 0)]
    assert (stopped / "model_latest.pth").exists() and not (stopped / "metrics.json").exists()

    # 2. the same command again: resubmits only the cancelled run, which resumes in its folder
    second = subprocess.run(cmd + ["--wait"], cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert second.returncode == 0, second.stdout + second.stderr
    assert second.stdout.count(": skipped") == 3 and "kvasir/tinyA seed 0: resume, Slurm job" in second.stdout
    folders = run_dirs(exp)
    assert all(len(f) == 1 for f in folders.values()) and folders[("tinyA", 0)] == [stopped], folders
    assert [r["state"] for r in slurm.status_rows(exp)] == ["finished"] * 4
    assert reference.wait(timeout=240) == 0
    (ref,) = run_dirs(tmp_path / "ref")[("tinyA", 0)]
    assert (stopped / "losses.csv").read_bytes() == (ref / "losses.csv").read_bytes()

    # 3. a third time: nothing to submit, the record unchanged
    before = (exp / slurm.RECORD).read_text()
    third = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert third.returncode == 0 and "nothing to submit" in third.stdout, third.stdout + third.stderr
    assert (exp / slurm.RECORD).read_text() == before


@pytest.mark.slurm
@pytest.mark.parametrize("more, match", [
    (["--slurm_partition", "no_such_partition"], "invalid partition specified: no_such_partition"),
    (["--slurm_time", "400-00:00:00"], "Requested time limit is invalid"),   # over the partition's limit
    (["--slurm_time", "soon"], "Invalid --time specification"),
])
def test_slurm_refuses_bad_resources_before_submitting(more, match, tmp_path, capsys):
    why = slurm_missing()
    if why:
        pytest.skip(why)
    a = tiny_preset(tmp_path / "a.yaml", "tinyA", "prop")
    exp = tmp_path / "exp"
    with pytest.raises(slurm.SlurmError, match=re.escape(match)) as caught:
        sweep.main(["--presets", str(a), "--root", "R", "--exp_path", str(exp), "--launcher", "slurm", *more])
    assert "\n" not in str(caught.value)
    assert not exp.exists()


@pytest.mark.slurm
def test_slurm_sweep_refused_while_a_local_sweep_runs(tmp_path):
    """The sweep lock holds across launchers: a Slurm submission waits for a local sweep of the same EXP."""
    why = slurm_missing()
    if why:
        pytest.skip(why)
    a = tiny_preset(tmp_path / "a.yaml", "tinyA", "prop")
    exp, root = tmp_path / "exp", fake_root(tmp_path / "R")  # a prepared layout: the sweep checks it first
    exp.mkdir()
    other = subprocess.Popen(["sleep", "60"])  # stands for the local sweep's process
    try:
        (exp / ".sweep.lock").write_text(f"{socket.gethostname()} {other.pid}")
        with pytest.raises(UserError, match=f"another sweep \\(pid {other.pid}\\) is running"):
            sweep.main(["--presets", str(a), "--root", str(root), "--exp_path", str(exp), "--launcher", "slurm"])
    finally:
        other.kill()
        other.wait()
    assert sorted(p.name for p in exp.iterdir()) == [".sweep.lock"]  # nothing submitted, nothing recorded
