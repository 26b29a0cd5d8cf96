"""run.py end to end on CPU, on synthetic data (no ../shared needed): the paper's command line, the run
folder, --test reproducing a run's metrics from the run alone, --resume continuing in place exactly, one
validation for flags and --config, and every user error as one line with exit status 2 and no run folder."""
import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import run
from engine.train import Trainer, weights_digest
from models.checkpoint import load_checkpoint, save_checkpoint
from models.segmentation_net import build_model
from parse_args import build_parser, parse_args
from tests.helpers import one_error_line, only_run_dir, tiny_argv

pytestmark = pytest.mark.usefixtures("one_thread")
PAPER_LINE = ("-m gaze_sup --data kvasir --model unet -bs 8 --exp_path EXP --root ROOT --spatial_size 224 "
              "--in_channels 3 --opt sgd --lr 1e-2 --lr_min 1e-4 --lr_scheduler cos --max_ite 15000 --num_levels 2 "
              "--cons_mode prop --cons_weight 3 --data_size_rate 1 --device 0 --seed 0")
RUN_FLAGS = ["--spatial_size", "64", "--max_ite", "6", "--log_step", "2", "--val_step", "3", "--save_step", "3",
             "--quiet"]


@pytest.fixture(scope="module")
def trained(data_root, tmp_path_factory):
    """A 6-iteration run at 64 px (SGD, 2 levels)."""
    exp = tmp_path_factory.mktemp("exp")
    assert run.cli(tiny_argv(data_root, exp, *RUN_FLAGS)) == 0
    return only_run_dir(exp)


def cli_error(capsys, argv) -> str:
    """The one stderr line of a command that must fail with exit status 2."""
    capsys.readouterr()
    assert run.cli(argv) == 2
    return one_error_line(capsys.readouterr().err)


# ---------------------------------------------------------------- parsing
def test_paper_command_line_parses_unchanged():
    args = parse_args(PAPER_LINE.split())
    assert (args.method, args.data, args.batch_size, args.spatial_size) == ("gaze_sup", "kvasir", 8, 224)
    assert args.opt == "sgd"
    assert (args.lr, args.lr_min, args.lr_scheduler, args.max_ite) == (1e-2, 1e-4, "cos", 15000)
    assert (args.num_levels, args.cons_mode, args.cons_weight, args.seed) == (2, "prop", 3.0, 0)
    assert parse_args(["-m", "gaze"]).method == "gaze_sup" and parse_args(["-m", "full"]).method == "full_sup"
    defaults = parse_args([])
    assert (defaults.spatial_size, defaults.lr, defaults.opt, defaults.lr_scheduler) == (384, 4e-4, "adam", "none")
    assert args.fp16 is False and parse_args(["--fp16"]).amp == "fp16"
    assert 1 <= defaults.num_worker <= min(4, len(os.sched_getaffinity(0)))


def test_config_file_sets_defaults_and_flags_override(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lr: 1e-2\nmax_ite: 7\nthresholds: [0.6, 0.2]\ndevice: 0\n")  # YAML reads 1e-2 as a string
    args = parse_args(["--config", str(cfg), "--max_ite", "9"])
    assert (args.lr, args.max_ite, args.thresholds, args.device) == (0.01, 9, [0.6, 0.2], "0")


def test_help_names_every_command_and_prints_each_default_once():
    text = build_parser().format_help()
    assert "run.py predict" in text and "run.py --demo" in text and "--resume --ckpt_path RUN" in text
    assert "(default: None)" not in text and "(default: False)" not in text
    entries = " ".join(text.split()).split(" --")
    assert all(e.count("default") <= 1 for e in entries), [e for e in entries if e.count("default") > 1]
    assert "ignored" in " ".join(text.split()).split("--model")[1][:200]


# ---------------------------------------------------------------- the run folder, --test
@pytest.mark.slow
def test_run_folder_and_test_reproduce_the_run_with_no_other_flag(trained, data_root, tmp_path, monkeypatch):
    for name in ("log.txt", "config.yaml", "metrics.json", "losses.csv", "per_image_metrics.csv",
                 "model_latest.pth", "model_best.pth", "model_ite3.pth", "model_ite6.pth"):
        assert (trained / name).is_file(), name
    metrics = json.loads((trained / "metrics.json").read_text())
    assert metrics["final_iteration"] == 6 and metrics["max_ite"] == 6 and metrics["status"] == "finished"
    assert [h["iteration"] for h in metrics["history"]] == [3, 6]
    monkeypatch.chdir(tmp_path)  # nothing may land in the default --exp_path (exp/) here
    # the run folder means model_best.pth: the test metrics recorded at the best iteration
    assert run.cli(["--test", "--ckpt_path", str(trained), "--root", str(data_root)]) == 0
    # model_latest.pth: the final metrics, without --root (the run recorded it)
    assert run.cli(["--test", "--ckpt_path", str(trained / "model_latest.pth"), "--quiet"]) == 0
    # each evaluation gets its own folder beside the run it evaluates
    best_dir, latest_dir = sorted(p for p in trained.parent.iterdir() if "_test_" in p.name)[-2:]
    assert not (tmp_path / "exp").exists()
    for test_dir, expected in ((best_dir, metrics["best"]["test"]), (latest_dir, metrics["final"])):
        tested = json.loads((test_dir / "metrics.json").read_text())["test"]
        for key in set(expected) & set(tested):
            assert tested[key] == expected[key] or np.isnan(tested[key]) and np.isnan(expected[key]), key
        config = (test_dir / "config.yaml").read_text()
        assert "spatial_size: 64" in config and "- 8\n- 8\n- 16" in config  # what was evaluated, not the defaults
    assert "mhd95" in json.loads((latest_dir / "metrics.json").read_text())["test"]


def test_test_refuses_a_flag_that_changes_the_evaluation(trained, capsys, tmp_path):
    line = cli_error(capsys, ["--test", "--ckpt_path", str(trained), "--spatial_size", "384", "--features",
                              "64,128,256,512,1024,128", "--exp_path", str(tmp_path / "exp")])
    assert "--spatial_size 384 (the run recorded 64)" in line and "--features" in line and str(trained) in line
    assert not (tmp_path / "exp").exists()


def test_test_ignores_training_only_flags_and_logs_them(trained, tmp_path):
    exp = tmp_path / "exp"
    assert run.cli(["--test", "--ckpt_path", str(trained), "--lr", "5", "-bs", "3", "--exp_path", str(exp),
                    "--quiet"]) == 0
    log = (only_run_dir(exp) / "log.txt").read_text()
    assert "--lr 5.0 ignored" in log and "--batch_size 3 ignored" in log


def test_paper_format_checkpoint_needs_spatial_size(data_root, tmp_path, capsys):
    model = build_model("gaze_sup", num_levels=2, features=(8, 8, 16, 16, 32, 8), feat_dim=8)
    path = tmp_path / "model_best.pth"
    torch.save({"state_dict": model.state_dict(), "opt": {}, "epoch": 3, "iteration": 100,
                "best_performance": np.float64(0.5), "best_iteration": 100}, path)
    base = ["--test", "--ckpt_path", str(tmp_path), "--root", str(data_root), "--exp_path", str(tmp_path / "exp")]
    line = cli_error(capsys, base)
    assert "--spatial_size" in line and "224" in line and not (tmp_path / "exp").exists()
    assert run.cli(base + ["--spatial_size", "32", "--quiet"]) == 0  # widths read off the weights
    assert json.loads((only_run_dir(tmp_path / "exp") / "metrics.json").read_text())["test"]["num_images"] == 4


# ---------------------------------------------------------------- --resume
def sigterm_at(monkeypatch, iteration: int, times: int = 1) -> None:
    """Send this process SIGTERM (`times` times) during the training step that makes `iteration`."""
    real = Trainer.train_step

    def step(self, images, targets):
        logs = real(self, images, targets)
        if self.iteration + 1 == iteration:
            for _ in range(times):
                os.kill(os.getpid(), signal.SIGTERM)
        return logs

    monkeypatch.setattr(Trainer, "train_step", step)


@pytest.mark.slow
def test_sigterm_then_resume_alone_continues_in_place_exactly(data_root, tmp_path, monkeypatch):
    flags = ["--max_ite", "9", "--log_step", "3", "--val_step", "4", "--lr_scheduler", "cos", "--lr_min", "1e-4",
             "--quiet"]
    assert run.cli(tiny_argv(data_root, tmp_path / "fresh", *flags)) == 0
    fresh = only_run_dir(tmp_path / "fresh")
    with monkeypatch.context() as m:
        sigterm_at(m, 5)  # between two losses.csv rows: the resumed row 6 must average iterations 4..6
        assert run.cli(tiny_argv(data_root, tmp_path / "exp", *flags)) == run.INTERRUPTED_EXIT
    stopped = only_run_dir(tmp_path / "exp")
    assert load_checkpoint(stopped / "model_latest.pth")["iteration"] == 5
    assert "resume with: python run.py --resume --ckpt_path" in (stopped / "log.txt").read_text()
    assert run.cli(["--resume", "--ckpt_path", str(stopped)]) == 0  # no --root, no --config
    assert only_run_dir(tmp_path / "exp") == stopped  # no second folder
    assert (stopped / "losses.csv").read_bytes() == (fresh / "losses.csv").read_bytes()
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (fresh, stopped))
    assert [h["iteration"] for h in b["history"]] == [4, 8, 9] and b["history"] == a["history"]
    assert b["best"] == a["best"] and (stopped / "model_best.pth").is_file()
    assert weights_digest_of(stopped) == weights_digest_of(fresh)
    log = (stopped / "log.txt").read_text()
    assert log.count("run folder:") == 2 and "resumed from" in log


def weights_digest_of(run_dir: Path) -> str:
    model = build_model("gaze_sup", num_levels=2, features=(8, 8, 16, 16, 32, 8), feat_dim=8)
    model.load_state_dict(load_checkpoint(run_dir / "model_latest.pth")["state_dict"])
    return weights_digest(model)


def test_resume_refuses_changes_that_break_continuation(trained, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in trained.iterdir()}
    line = cli_error(capsys, ["--resume", "--ckpt_path", str(trained), "-bs", "2", "--lr", "0.5", "--opt", "adam",
                              "--spatial_size", "32", "--max_ite", "12"])
    for part in ("--batch_size 2 (the run recorded 4)", "--lr 0.5 (the run recorded 0.01)",
                 "--opt adam (the run recorded sgd)", "--spatial_size 32 (the run recorded 64)"):
        assert part in line
    assert {p.name: p.stat().st_mtime_ns for p in trained.iterdir()} == before  # nothing touched


def test_resume_from_an_older_checkpoint_would_lose_progress(trained, capsys):
    line = cli_error(capsys, ["--resume", "--ckpt_path", str(trained / "model_ite3.pth")])
    assert "iteration 3" in line and "continued to 6" in line


def test_second_sigterm_exits_130_with_one_line(data_root, tmp_path, monkeypatch, capsys):
    sigterm_at(monkeypatch, 2, times=2)
    capsys.readouterr()
    assert run.cli(tiny_argv(data_root, tmp_path / "exp", "--max_ite", "5", "--quiet")) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "second SIGTERM" in err[0]
    assert "error: second SIGTERM" in (only_run_dir(tmp_path / "exp") / "log.txt").read_text()


# ---------------------------------------------------------------- model first
def test_initial_weights_do_not_depend_on_preload_or_val_fraction(data_root, tmp_path, monkeypatch):
    """The model is built from the seed before any data is read, as the paper's code does."""
    seen = []
    monkeypatch.setattr(Trainer, "fit", lambda self: seen.append(weights_digest(self.model)) or {})
    for k, extra in enumerate([["--preload", "yes"], ["--preload", "no"], ["--val_fraction", "0.25"],
                               ["--val_fraction", "0.25", "--preload", "no"]]):
        assert run.cli(tiny_argv(data_root, tmp_path / str(k), "--quiet", *extra)) == 0
    torch.manual_seed(0)
    oracle = build_model("gaze_sup", num_levels=2, features=(8, 8, 16, 16, 32, 8), feat_dim=8)
    assert seen == [weights_digest(oracle)] * 4


# ---------------------------------------------------------------- data spec, full_sup, mixed precision
def test_data_spec_path_names_the_run_folder_and_full_sup_selects_on_miou(data_root, tmp_path):
    spec = tmp_path / "specs" / "my_polyps.yaml"
    spec.parent.mkdir()
    spec.write_text((Path(run.__file__).parent / "configs" / "data" / "kvasir.yaml").read_text()
                    .replace("name: kvasir", "name: my_polyps"))
    exp = tmp_path / "exp"
    assert run.cli(tiny_argv(data_root, exp, "-m", "full", "--data", str(spec), "--max_ite", "4", "--val_step", "2",
                             "--quiet")) == 0
    (run_dir,) = (exp / "0" / "my_polyps").iterdir()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert "miou" in metrics["best"] and "mdice_1" not in metrics["final"]


@pytest.mark.parametrize("amp", [["--fp16"], ["--amp", "bf16"]])
@pytest.mark.slow
def test_mixed_precision_trains_and_checkpoints_the_scaler(data_root, tmp_path, amp):
    """The paper's --fp16 crashes (GradScaler.update() is never called); here the scaler steps, updates and
    is saved, so a resumed fp16 run keeps its scale."""
    exp = tmp_path / "exp"
    assert run.cli(tiny_argv(data_root, exp, "--max_ite", "3", "--val_step", "3", "--quiet", *amp)) == 0
    ckpt = load_checkpoint(only_run_dir(exp) / "model_latest.pth")
    assert ckpt["iteration"] == 3
    if amp == ["--fp16"]:
        assert ckpt["scaler"]["scale"] > 0 and ckpt["scaler"]["_growth_tracker"] == 3


def test_validation_split_selects_model_best(data_root, tmp_path):
    exp = tmp_path / "exp"
    assert run.cli(tiny_argv(data_root, exp, "--max_ite", "4", "--val_step", "2", "--val_fraction", "0.25",
                             "--quiet")) == 0
    metrics = json.loads((only_run_dir(exp) / "metrics.json").read_text())
    assert metrics["best"]["selected_on"] == "val"
    assert all(h["val"]["num_images"] == 2 for h in metrics["history"])  # round(8 * 0.25) held-out ids
    assert metrics["final"]["num_images"] == 4  # the test split is still reported
    best = max(metrics["history"], key=lambda h: h["val"]["mdice"])
    assert metrics["best"]["iteration"] == best["iteration"]


# ---------------------------------------------------------------- user errors
YAML_CASES = {
    "lr_scheduler: cosine\n": "key lr_scheduler: 'cosine' is not valid; expected one of none, cos",
    "opt: adamw\n": "key opt: 'adamw'",
    "amp: fp32\n": "key amp: 'fp32'",
    "batch_size: [2, 3]\n": "key batch_size: [2, 3] is not valid; expected an integer",
    "max_ite: 4.5\n": "key max_ite: 4.5 is not valid; expected an integer",
    "features: 4\n": "key features: 4 is not valid; expected a list of integers",
    "method: supervised\n": "key method: 'supervised'",
    "lr: [\n": "invalid YAML at line 2",
    "no_such_flag: 1\n": "unknown key(s) ['no_such_flag']",
    "- 1\n- 2\n": "expected a mapping",
    "max_ite: 0\n": "--max_ite 0: expected a value >= 1",
}
FLAG_CASES = [
    (["-bs", "0"], "--batch_size 0: expected a value >= 1"),
    (["-bs", "-2"], "--batch_size -2"),
    (["--val_step", "0"], "--val_step 0"),
    (["--log_step", "0"], "--log_step 0"),
    (["--save_step", "0"], "--save_step 0"),
    (["--max_ite", "0"], "--max_ite 0"),
    (["--thresholds", "1.5,-0.2"], "--thresholds [1.5, -0.2]: expected 2 value(s)"),
    (["--thresholds", "0.5"], "--thresholds [0.5]: expected 2 value(s)"),
    (["--data_size_rate", "0"], "--data_size_rate 0.0: expected a value in (0, 1]"),
    (["--num_levels", "0"], "--num_levels 0: expected a value >= 1"),
    (["--lr", "0"], "--lr 0.0: expected a value > 0"),
    (["--lr_min", "-1"], "--lr_min -1.0"),
    (["--features", "8,8,16"], "--features [8, 8, 16]: expected 6"),
    (["--opt", "adamw"], "argument --opt: invalid choice: 'adamw'"),
    (["-bs", "two"], "argument -bs/--batch_size: invalid int value: 'two'"),
    (["--data", "colon"], "unknown --data 'colon'"),
    (["--data", "no/such/spec.yaml"], "dataset spec not found: no/such/spec.yaml"),
    (["--num_levels", "9"], "no thresholds for 9 level(s)"),
    (["--test"], "--test needs --ckpt_path"),
    (["--resume"], "--resume needs --ckpt_path"),
    (["--test", "--resume", "--ckpt_path", "x"], "--test and --resume exclude each other"),
    (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "99"], "--device"),
]


@pytest.mark.parametrize("text", list(YAML_CASES))
def test_bad_config_file_is_one_line_naming_file_and_key(text, data_root, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    line = cli_error(capsys, tiny_argv(data_root, tmp_path / "exp", "--quiet", "--config", str(cfg)))
    assert str(cfg) in line and YAML_CASES[text] in line
    assert not (tmp_path / "exp").exists()


def test_config_that_is_a_folder_or_missing(tmp_path, capsys):
    assert "is a folder; expected a YAML file" in cli_error(capsys, ["--config", str(tmp_path)])
    assert "file not found" in cli_error(capsys, ["--config", str(tmp_path / "none.yaml")])


@pytest.mark.parametrize("flags,expect", FLAG_CASES, ids=[" ".join(f) for f, _ in FLAG_CASES])
def test_bad_flag_is_one_line_naming_the_flag(flags, expect, data_root, tmp_path, capsys):
    line = cli_error(capsys, tiny_argv(data_root, tmp_path / "exp", "--max_ite", "2", "--quiet", *flags))
    assert expect in line
    assert not (tmp_path / "exp").exists()


def _corrupt_checkpoint(kind: str, tmp_path: Path, trained: Path) -> Path:
    path = tmp_path / f"{kind}.pth"
    if kind == "list":
        torch.save([1, 2, 3], path)
    elif kind == "tensor":
        torch.save(torch.zeros(3), path)
    elif kind == "nan":
        ckpt = load_checkpoint(trained / "model_latest.pth")
        ckpt["state_dict"] = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
                              for k, v in ckpt["state_dict"].items()}
        save_checkpoint(path, ckpt)
    elif kind == "zero_levels":
        ckpt = load_checkpoint(trained / "model_latest.pth")
        ckpt["args"]["num_levels"] = 0
        save_checkpoint(path, ckpt)
    return path


@pytest.mark.parametrize("kind,expect", [("list", "holds a list"), ("tensor", "holds a Tensor"),
                                         ("nan", "not finite"), ("zero_levels", "num_levels is 0")])
def test_unusable_checkpoint_is_one_line_naming_it(kind, expect, trained, tmp_path, capsys):
    path = _corrupt_checkpoint(kind, tmp_path, trained)
    line = cli_error(capsys, ["--test", "--ckpt_path", str(path), "--exp_path", str(tmp_path / "exp")])
    assert str(path) in line and expect in line
    assert not (tmp_path / "exp").exists()


@pytest.mark.parametrize("case", ["missing_root", "missing_split", "missing_image", "missing_gaze",
                                  "size_mismatch", "corrupt_image"])
def test_bad_data_fails_before_training_naming_the_path(case, data_root, tmp_path, capsys):
    root = tmp_path / "root"
    if case != "missing_root":
        import shutil
        shutil.copytree(data_root, root)
    ids = (root / "train.txt").read_text().split() if root.exists() else []
    expect = {"missing_root": "root", "missing_split": "train.txt"}.get(case, ids[0] + ".jpg" if ids else "")
    if case == "missing_split":
        (root / "train.txt").unlink()
    elif case == "missing_image":
        (root / "images" / f"{ids[0]}.jpg").unlink()
    elif case == "missing_gaze":
        (root / "gaze" / "crf_compat1" / f"{ids[0]}.jpg").unlink()
    elif case == "size_mismatch":
        Image.fromarray(np.zeros((10, 12), np.uint8)).save(root / "gaze" / "crf_compat1" / f"{ids[0]}.jpg")
    elif case == "corrupt_image":
        (root / "images" / f"{ids[0]}.jpg").write_bytes(b"not a jpeg at all")
    line = cli_error(capsys, tiny_argv(root, tmp_path / "exp", "--max_ite", "2", "--quiet"))
    assert expect in line
    assert not (tmp_path / "exp").exists()


def test_training_without_root_is_one_line(tmp_path, capsys):
    line = cli_error(capsys, ["--max_ite", "2", "--exp_path", str(tmp_path / "exp")])
    assert "--root is required to train" in line
    assert not (tmp_path / "exp").exists()
