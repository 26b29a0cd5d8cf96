"""Runs that survive faults: SIGTERM -> resumable checkpoint and exit 130, exact resume; a diverged loss stops
with a clear message and keeps the last good checkpoint; checkpoint writes are atomic; an unwritable or full
exp_path fails before any work; --deterministic CPU runs are bit-identical."""
import csv
import io
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import run
from engine.run_folder import RunError
from models.checkpoint import checkpoint_state_dict, load_checkpoint
from tests.helpers import only_run_dir, tiny_argv

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("one_thread")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def loss_rows(run_dir: Path) -> list:
    path = run_dir / "losses.csv"
    if not path.exists():
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def weights(path: Path) -> dict:
    return checkpoint_state_dict(load_checkpoint(path))


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_that_resumes_exactly(tmp_path, data_root):
    """A real SIGTERM from outside: exit 130 and a resumable checkpoint; `--resume --ckpt_path RUN` alone (as the
    log says) finishes in the same folder with the uninterrupted run's losses.csv."""
    exp = tmp_path / "exp"
    flags = ["--max_ite", "60", "--log_step", "3", "--val_step", "100000", "--save_step", "100000", "--quiet"]
    proc = subprocess.Popen([sys.executable, "run.py", *tiny_argv(data_root, exp, *flags)], cwd=REPO, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            runs = list((exp / "0" / "kvasir").glob("*")) if (exp / "0" / "kvasir").exists() else []
            if runs and len(loss_rows(runs[0])) >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    run_dir = only_run_dir(exp)
    ckpt = load_checkpoint(run_dir / "model_latest.pth")
    stopped = ckpt["iteration"]
    assert 6 <= stopped < 60 and int(loss_rows(run_dir)[-1]["iteration"]) == stopped - stopped % 3
    assert {"opt", "history", "args", "loss_window"} <= set(ckpt) and len(ckpt["loss_window"][0]) == stopped % 3
    hint = f"resume with: python run.py --resume --ckpt_path {run_dir}"
    assert "SIGTERM" in out and hint in out and "Traceback" not in err

    assert run.main(hint.split("run.py ")[1].split()) == 0
    assert only_run_dir(exp) == run_dir
    fresh_exp = tmp_path / "fresh"
    assert run.main(tiny_argv(data_root, fresh_exp, *flags)) == 0
    fresh = only_run_dir(fresh_exp)
    assert (run_dir / "losses.csv").read_bytes() == (fresh / "losses.csv").read_bytes()
    assert_same_weights(weights(run_dir / "model_latest.pth"), weights(fresh / "model_latest.pth"))


def test_stop_flag_first_signal_asks_second_forces():
    from engine.train import StopFlag
    with StopFlag() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # the handler runs between bytecodes of the main thread
        assert stop.signal == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
    # stopping: later signals are ignored, so that the process ends with its one line and status 130
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN == signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with StopFlag():
        pass
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # no signal: the handlers are restored


@pytest.mark.slow
def test_diverging_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, data_root):
    exp = tmp_path / "exp"
    # SGD with lr 1e30: the first update blows the weights up, the next loss is NaN
    cmd = [sys.executable, "run.py", *tiny_argv(data_root, exp, "--lr", "1e30", "--max_ite", "20", "--log_step", "1",
                                                 "--val_step", "1", "--quiet")]
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "error:" in proc.stderr and "Traceback" not in proc.stderr
    assert "stopping" in proc.stderr or "not finite" in proc.stderr, proc.stderr
    run_dir = only_run_dir(exp)
    ckpt = load_checkpoint(run_dir / "model_latest.pth")  # loadable
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())
    rows = loss_rows(run_dir)
    assert ckpt["iteration"] == int(rows[-1]["iteration"]) and all(float(r["loss"]) == float(r["loss"]) for r in rows)
    assert f"iteration {ckpt['iteration'] + 1}" in proc.stderr  # the first bad one
    assert not (run_dir / "metrics.json").exists()
    assert "error: the loss is" in (run_dir / "log.txt").read_text()  # the run's log says how it ended


@pytest.mark.slow
def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, data_root, monkeypatch):
    real_save = torch.save
    seen = {"calls": 0}

    def crashing_save(obj, f, *args, **kwargs):
        seen["calls"] += 1
        if seen["calls"] < 3:  # iteration 2 writes model_latest and model_best; iteration 4 crashes
            return real_save(obj, f, *args, **kwargs)
        latest = Path(f.name).with_name("model_latest.pth")
        seen["latest"], seen["bytes"] = latest, latest.read_bytes()
        buf = io.BytesIO()
        real_save(obj, buf)
        f.write(buf.getvalue()[:len(buf.getvalue()) // 2])  # half the file, then the disk is full
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(RunError, match="No space left on device"):
        run.main(tiny_argv(data_root, tmp_path / "exp", "--max_ite", "4", "--val_step", "2", "--quiet"))
    monkeypatch.undo()
    latest = seen["latest"]
    assert latest.read_bytes() == seen["bytes"]
    assert load_checkpoint(latest)["iteration"] == 2
    assert sorted(p.name for p in latest.parent.glob("*.pth*")) == ["model_best.pth", "model_latest.pth"]  # no .tmp


def test_unwritable_exp_path_fails_before_any_work(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    exp = blocker / "exp"
    # --root does not exist either: the exp_path error must come first (no data is read before it)
    with pytest.raises(RunError, match=re.escape(f"cannot write to --exp_path {exp}")):
        run.main(tiny_argv(tmp_path / "no_such_root", exp, "--quiet"))


@pytest.mark.slow
def test_free_space_check_scales_with_the_checkpoint_size(tmp_path, data_root, monkeypatch):
    """A tiny model's run fits in 100 MiB; the paper's widths with 3 model_ite files do not."""
    import shutil
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=100 * 1024 ** 2))
    assert run.main(tiny_argv(data_root, tmp_path / "ok", "--max_ite", "1", "--quiet")) == 0
    paper = ["--features", "64,128,256,512,1024,128", "--feat_dim", "128", "--max_ite", "15000"]
    with pytest.raises(RunError, match="only 100 MiB free under .*need about [0-9]+ MiB"):
        run.main(tiny_argv(tmp_path / "no_such_root", tmp_path / "exp", "--quiet", *paper))
    assert not (tmp_path / "exp").exists()


@pytest.mark.slow
def test_tensorboard_write_failure_warns_once_and_the_run_goes_on(tmp_path, data_root, monkeypatch):
    from torch.utils.tensorboard import SummaryWriter
    calls = []

    def full_disk(self, *args, **kwargs):
        calls.append(1)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(SummaryWriter, "add_scalar", full_disk)
    assert run.main(tiny_argv(data_root, tmp_path / "exp", "--max_ite", "4", "--log_step", "1", "--val_step", "2",
                              "--quiet")) == 0
    run_dir = only_run_dir(tmp_path / "exp")
    log = (run_dir / "log.txt").read_text()
    assert len(calls) == 1 and log.count("TensorBoard logging stopped") == 1
    assert (run_dir / "metrics.json").is_file() and len(loss_rows(run_dir)) == 4


@pytest.mark.slow
def test_error_in_a_dataloader_worker_reads_as_without_workers(tmp_path, data_root):
    """A test image whose header is fine but whose data is cut: decoded in a worker with --num_worker 1."""
    import shutil
    root = tmp_path / "root"
    shutil.copytree(data_root, root)
    test_id = (root / "test.txt").read_text().split()[0]
    image = root / "images" / f"{test_id}.jpg"
    image.write_bytes(image.read_bytes()[:300])
    messages = []
    for workers in ("0", "1"):
        cmd = [sys.executable, "run.py", *tiny_argv(root, tmp_path / f"exp{workers}", "--quiet", "--max_ite", "1",
                                                     "--num_worker", workers)]
        proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        messages.append(proc.stderr.strip().splitlines())
    assert messages[0] == messages[1] and len(messages[0]) == 1 and str(image) in messages[0][0]
    assert not (tmp_path / "exp0").exists() and not (tmp_path / "exp1").exists()


@pytest.mark.slow
def test_deterministic_runs_are_bit_identical(tmp_path, data_root, capsys):
    dirs = []
    try:
        for name in ("a", "b"):
            argv = tiny_argv(data_root, tmp_path / name, "--max_ite", "4", "--val_step", "4", "--log_step", "1",
                             "--deterministic", "--quiet")
            assert run.main(argv) == 0
            dirs.append(only_run_dir(tmp_path / name))
    finally:
        torch.use_deterministic_algorithms(False)
    a, b = dirs
    assert (a / "losses.csv").read_bytes() == (b / "losses.csv").read_bytes()
    assert len(loss_rows(a)) == 4
    assert_same_weights(weights(a / "model_latest.pth"), weights(b / "model_latest.pth"))
    err = capsys.readouterr().err
    assert "it/s" not in err and "s/it" not in err  # --quiet: no progress bar
