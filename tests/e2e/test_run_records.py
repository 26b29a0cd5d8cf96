"""What a run records and how later commands treat it: one-shot command keys are never settings; the resolved
dataset spec is recorded and used by --test/--resume (no spec file needed); a run folder is locked by the one
process that trains in it; a record that disagrees with its checkpoint, a checkpoint without optimizer state
or with weights that do not fit, a run name that is a path, an --exp_path given to --resume: one line, exit 2,
nothing changed."""
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import run
from common import dataspec
from tests.helpers import REPO, only_run_dir, tiny_argv, tiny_dataset

pytestmark = pytest.mark.usefixtures("one_thread")
FLAGS = ["--max_ite", "4", "--val_step", "2", "--log_step", "2", "--save_step", "1000", "--quiet"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.mktemp("data"), num_train=4, num_test=2)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_root):
    """A finished 4-iteration run trained on a spec file given by a relative path."""
    base = tmp_path_factory.mktemp("trained")
    shutil.copy(dataspec.BUILTIN_DIR / "kvasir.yaml", base / "spec.yaml")
    argv = tiny_argv(data_root, base / "exp", *FLAGS)
    argv[argv.index("--data") + 1] = "spec.yaml"
    cwd = Path.cwd()
    try:
        import os
        os.chdir(base)
        assert run.cli(argv) == 0
    finally:
        os.chdir(cwd)
    return only_run_dir(base / "exp"), base / "spec.yaml"


def copy_run(trained, tmp_path) -> Path:
    run_dir = tmp_path / "exp" / "0" / "kvasir" / trained[0].name
    shutil.copytree(trained[0], run_dir)
    (run_dir / ".lock").unlink(missing_ok=True)
    return run_dir


def digests(folder: Path) -> dict:
    return {p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


def refused(capsys, argv, *needles) -> str:
    """The command exits 2 with one `error:` line containing every needle, and no traceback."""
    capsys.readouterr()
    assert run.cli([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_a_run_records_settings_and_its_spec_not_commands(trained):
    run_dir, spec = trained
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert not {"resume", "test", "ckpt_path", "demo", "config"} & set(config)
    assert config["data"] == str(spec)  # absolute: the run does not depend on where it was started
    recorded = yaml.safe_load((run_dir / "data_spec.yaml").read_text())
    assert recorded == dataspec.spec_record(dataspec.load_spec("kvasir"))
    ckpt = torch.load(run_dir / "model_latest.pth", weights_only=True)
    assert ckpt["data_spec"] == recorded and "resume" not in ckpt["args"]


def test_reusing_a_resumed_runs_config_starts_a_new_run(trained, data_root, tmp_path, capsys):
    """A run resumed once, its config.yaml given to --config with another --exp_path: a new run there, the old
    run untouched. A --config holding a command key is refused, saying to pass it on the command line."""
    run_dir = copy_run(trained, tmp_path)
    assert run.cli(["--resume", "--ckpt_path", str(run_dir), "--max_ite", "6", "--root", str(data_root)]) == 0
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["max_ite"] == 6 and "resume" not in config and "ckpt_path" not in config
    before = digests(run_dir)
    new = tmp_path / "new"
    assert run.cli(["--config", str(run_dir / "config.yaml"), "--exp_path", str(new), "--max_ite", "2"]) == 0
    assert digests(run_dir) == before
    assert json.loads((only_run_dir(new) / "metrics.json").read_text())["final_iteration"] == 2

    legacy = tmp_path / "legacy.yaml"
    legacy.write_text(yaml.safe_dump({**config, "resume": True, "ckpt_path": str(run_dir)}))
    refused(capsys, ["--config", legacy, "--exp_path", tmp_path / "x"], "resume: True", "command line")
    assert digests(run_dir) == before and not (tmp_path / "x").exists()


def test_the_recorded_spec_is_used_after_the_file_changes(trained, data_root, tmp_path, capsys):
    """--test from another directory needs no spec file; an edited spec file is reported and not used by --test;
    --resume refuses it; the same spec by its absolute path is accepted."""
    run_dir = copy_run(trained, tmp_path)
    out = tmp_path / "eval"
    assert run.cli(["--test", "--ckpt_path", str(run_dir), "--exp_path", str(out), "--quiet"]) == 0
    first = json.loads(next(out.rglob("metrics.json")).read_text())["test"]
    images = data_root / "images"
    assert run.cli(["predict", "--ckpt_path", str(run_dir), "--input", str(images), "--out", str(tmp_path / "p1")]) == 0
    spec = trained[1]
    original = spec.read_text()
    try:
        spec.write_text(original.replace("normalization: imagenet", "normalization: {mean: [0, 0, 0], std: "
                                                                    "[1, 1, 1]}"))
        dataspec._CACHE.clear()
        out2 = tmp_path / "eval2"
        assert run.cli(["--test", "--ckpt_path", str(run_dir), "--exp_path", str(out2)]) == 0
        assert json.loads(next(out2.rglob("metrics.json")).read_text())["test"] == first
        assert "changed since the run recorded it (normalization); using the recorded spec" in capsys.readouterr().out
        assert run.cli(["predict", "--ckpt_path", str(run_dir), "--input", str(images), "--out",
                        str(tmp_path / "p2")]) == 0
        assert "note: the dataset spec" in capsys.readouterr().out
        assert digests(tmp_path / "p1") == digests(tmp_path / "p2")
        before = digests(run_dir)
        refused(capsys, ["--resume", "--ckpt_path", run_dir, "--max_ite", "6"], "changed since the run recorded it",
                "normalization")
        assert digests(run_dir) == before
    finally:
        spec.write_text(original)
        dataspec._CACHE.clear()
    # the same spec by its absolute path (it was given relative): not a change
    out3 = tmp_path / "eval3"
    assert run.cli(["--test", "--ckpt_path", str(run_dir), "--data", str(spec), "--exp_path", str(out3)]) == 0


def test_a_run_folder_is_locked_by_its_trainer(trained, tmp_path, capsys):
    """A second trainer is refused at once, naming the holder's pid; once the holder is gone its lock is taken
    over; --test reads the locked run."""
    run_dir = copy_run(trained, tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time\n"
                               f"fd = os.open({str(run_dir / '.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
                               "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, str(os.getpid()).encode())\n"
                               "print('locked', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = digests(run_dir)
        refused(capsys, ["--resume", "--ckpt_path", run_dir, "--max_ite", "6"], f"pid {holder.pid}", "in use")
        assert digests(run_dir) == before
        assert run.cli(["--test", "--ckpt_path", str(run_dir), "--exp_path", str(tmp_path / "eval"), "--quiet"]) == 0
    finally:
        holder.kill()
        holder.wait()
    assert (run_dir / ".lock").read_text().strip() == str(holder.pid)  # stale: its process is gone
    assert run.cli(["--resume", "--ckpt_path", str(run_dir), "--max_ite", "6"]) == 0


def test_a_hand_edited_config_is_an_error_listing_the_difference(trained, tmp_path, capsys):
    run_dir = copy_run(trained, tmp_path)
    path = run_dir / "config.yaml"
    path.write_text(path.read_text().replace("lr: 0.01", "lr: 0.05"))
    before = digests(run_dir)
    refused(capsys, ["--resume", "--ckpt_path", run_dir, "--max_ite", "6"], "lr: config.yaml 0.05, checkpoint 0.01")
    assert digests(run_dir) == before


def test_a_checkpoint_without_optimizer_state_is_not_resumed(trained, tmp_path, capsys):
    run_dir = copy_run(trained, tmp_path)
    ckpt = torch.load(run_dir / "model_latest.pth", weights_only=True)
    del ckpt["opt"]
    torch.save(ckpt, run_dir / "model_latest.pth")
    before = digests(run_dir)
    refused(capsys, ["--resume", "--ckpt_path", run_dir, "--max_ite", "6"], "no optimizer state ('opt')")
    assert digests(run_dir) == before


def test_resume_with_weights_that_do_not_fit_is_one_line(trained, tmp_path, capsys):
    run_dir = copy_run(trained, tmp_path)
    ckpt = torch.load(run_dir / "model_latest.pth", weights_only=True)
    ckpt["state_dict"].pop(next(iter(ckpt["state_dict"])))
    torch.save(ckpt, run_dir / "model_latest.pth")
    before = digests(run_dir)
    refused(capsys, ["--resume", "--ckpt_path", run_dir, "--max_ite", "6"], "incompatible checkpoint", "missing keys")
    assert digests(run_dir) == before


@pytest.mark.parametrize("name", ["../../../x", "a/b", ".."])
def test_a_run_name_is_one_folder_name(name, data_root, tmp_path, capsys):
    refused(capsys, tiny_argv(data_root, tmp_path / "exp", *FLAGS, "--run_name", name), "--run_name", "one folder")
    assert not (tmp_path / "exp").exists() and not (tmp_path / "x").exists()


def test_resume_of_a_finished_run_records_its_last_evaluation_once(trained, tmp_path, capsys):
    run_dir = copy_run(trained, tmp_path)
    assert run.cli(["--resume", "--ckpt_path", str(run_dir)]) == 0
    history = json.loads((run_dir / "metrics.json").read_text())["history"]
    assert [h["iteration"] for h in history] == [2, 4]
    # --resume continues in the run's own folder: another --exp_path is refused, not ignored
    before = digests(run_dir)
    refused(capsys, ["--resume", "--ckpt_path", run_dir, "--exp_path", tmp_path / "elsewhere"], "--exp_path",
            "own folder")
    assert digests(run_dir) == before and not (tmp_path / "elsewhere").exists()


def test_predict_leaves_nothing_behind_or_says_what_it_wrote(trained, tmp_path, capsys):
    """A gray image for an RGB model: no --out folder left behind. A folder whose last JPEG is truncated: the line
    says which images were written."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    gray = tmp_path / "gray"
    gray.mkdir()
    Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)).save(gray / "g.png")
    out = tmp_path / "out"
    refused(capsys, ["predict", "--ckpt_path", trained[0], "--input", gray, "--out", out], "g.png", "channel")
    assert not out.exists()

    images = tmp_path / "images"
    images.mkdir()
    for name in ("a", "b", "c"):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(images / f"{name}.jpg")
    data = (images / "c.jpg").read_bytes()
    (images / "c.jpg").write_bytes(data[:len(data) // 2])
    line = refused(capsys, ["predict", "--ckpt_path", trained[0], "--input", images, "--out", out], "c.jpg")
    assert "the 2 image(s) before it (a.jpg to b.jpg) were written" in line, line
    assert sorted(p.name for p in out.iterdir()) == ["a_mask.png", "a_overlay.png", "b_mask.png", "b_overlay.png"]


def test_a_png_where_the_spec_expects_jpg_gets_a_hint(data_root, tmp_path, capsys):
    root = tmp_path / "root"
    shutil.copytree(data_root, root)
    first = (root / "train.txt").read_text().split()[0]
    from PIL import Image
    Image.open(root / "images" / f"{first}.jpg").save(root / "images" / f"{first}.png")
    (root / "images" / f"{first}.jpg").unlink()
    refused(capsys, tiny_argv(root, tmp_path / "exp", *FLAGS, "--preload", "no"), f"{first}.jpg",
            f"there is {first}.png", "expects .jpg")


def test_yaml_and_spec_mistakes_are_named(data_root, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("features: 4\n")
    refused(capsys, tiny_argv(data_root, tmp_path / "exp", "--config", config), "key features",
            "a list of integers, e.g. [8, 8, 16, 16, 32, 8]")
    spec = tmp_path / "spec.yaml"
    spec.write_text((dataspec.BUILTIN_DIR / "kvasir.yaml").read_text() + "in_channels: 1\n")
    argv = tiny_argv(data_root, tmp_path / "exp")
    argv[argv.index("--data") + 1] = str(spec)
    refused(capsys, argv, str(spec), "key 'in_channels' is given twice at line")
    assert not (tmp_path / "exp").exists()


def test_a_full_disk_warns_once_for_the_log_and_once_for_tensorboard(trained, tmp_path, capsys, monkeypatch):
    """log.txt on a full disk (/dev/full) and TensorBoard's writer thread failing: one warning each, no
    traceback, and training goes on to its end."""
    from tensorboard.summary.writer import record_writer

    run_dir = copy_run(trained, tmp_path)
    (run_dir / "log.txt").unlink()
    (run_dir / "log.txt").symlink_to("/dev/full")

    real, writes = record_writer.RecordWriter.write, []

    def full(self, data):  # the disk fills after the first few events (the thread writes them)
        writes.append(1)
        if len(writes) > 3:
            raise OSError(28, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(record_writer.RecordWriter, "write", full)
    capsys.readouterr()
    assert run.cli(["--resume", "--ckpt_path", str(run_dir), "--max_ite", "8", "--log_step", "1"]) == 0
    captured = capsys.readouterr()
    both = captured.out + captured.err
    assert "Traceback" not in both and "Logging error" not in both, both
    assert captured.err.count("warning: cannot write") == 1 and "log.txt" in captured.err
    assert both.count("TensorBoard logging stopped") == 1
    assert json.loads((run_dir / "metrics.json").read_text())["final_iteration"] == 8


@pytest.mark.slow
@pytest.mark.parametrize("gap", [0.01, 0.3])
def test_a_second_sigterm_ends_with_one_line_and_status_130(data_root, tmp_path, gap):
    import os
    import signal
    import time
    exp = tmp_path / "exp"
    cmd = [sys.executable, "run.py", *tiny_argv(data_root, exp, "--max_ite", "100000", "--val_step", "100000",
                                                "--log_step", "1", "--save_step", "100000", "--quiet")]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not list(exp.glob("0/kvasir/*/losses.csv")):
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        time.sleep(gap)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, (proc.returncode, err)
    assert "Traceback" not in err and len([line for line in err.splitlines() if "error:" in line]) <= 1, err
    assert out.count("SIGTERM") + err.count("SIGTERM") == 1, (out, err)


def test_the_documented_identity_is_the_code():
    """docs/reference/run-folder.md lists the flags left out of a run's identity: exactly parse_args's."""
    import re

    import parse_args
    text = (REPO / "docs" / "reference" / "run-folder.md").read_text()
    section = text.split("## A run's identity")[1].split("Thresholds count")[0]
    documented = set(re.findall(r"`--(\w+)`", section))
    assert documented == set(parse_args.RESULT_NEUTRAL) - set(parse_args.COMMANDS) - {"seed"}


def test_disk_messages_say_what_is_true(data_root, tmp_path, monkeypatch, capsys):
    """Too little space for the logs alone does not suggest --save_step; a first checkpoint that cannot be
    written does not speak of a previous one."""
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=10 * 1024 ** 2))
    line = refused(capsys, tiny_argv(data_root, tmp_path / "exp", *FLAGS), "only 10 MiB free")
    assert "--save_step" not in line and not (tmp_path / "exp").exists()
    monkeypatch.undo()

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    line = refused(capsys, tiny_argv(data_root, tmp_path / "exp2", *FLAGS), "No space left on device")
    assert "no earlier model_latest.pth was written" in line and "intact" not in line
