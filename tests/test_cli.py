"""run.py end to end on CPU: the paper's command line, training on real Kvasir images with real gaze,
--test reproducing a run's metrics, exact --resume, and errors raised before training starts."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import run
from common.errors import UserError
from parse_args import parse_args

PAPER_LINE = ("-m gaze_sup --data kvasir --model unet -bs 8 --exp_path EXP --root ROOT --spatial_size 224 "
              "--in_channels 3 --opt sgd --lr 1e-2 --lr_min 1e-4 --lr_scheduler cos --max_ite 15000 --num_levels 2 "
              "--cons_mode prop --cons_weight 3 --data_size_rate 1 --device 0 --seed 0")
TINY = ["--spatial_size", "32", "--features", "8,8,16,16,32,8", "--feat_dim", "8", "-bs", "2", "--opt", "adam",
        "--lr", "1e-3", "--num_worker", "0", "--quiet"]
TRAIN_IDS, TEST_IDS = 6, 2


def test_paper_command_line_parses_unchanged():
    args = parse_args(PAPER_LINE.split())
    assert (args.method, args.data, args.batch_size, args.spatial_size, args.opt) == ("gaze_sup", "kvasir", 8, 224, "sgd")
    assert (args.lr, args.lr_min, args.lr_scheduler, args.max_ite) == (1e-2, 1e-4, "cos", 15000)
    assert (args.num_levels, args.cons_mode, args.cons_weight, args.seed) == (2, "prop", 3.0, 0)
    assert parse_args(["-m", "gaze"]).method == "gaze_sup" and parse_args(["-m", "full"]).method == "full_sup"
    defaults = parse_args([])
    assert (defaults.spatial_size, defaults.lr, defaults.opt, defaults.lr_scheduler) == (384, 4e-4, "adam", "none")
    assert args.fp16 is False and parse_args(["--fp16"]).amp == "fp16"


def test_config_file_sets_defaults_and_flags_override(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lr: 0.05\nmax_ite: 7\nthresholds: [0.6, 0.2]\n")
    args = parse_args(["--config", str(cfg), "--max_ite", "9"])
    assert (args.lr, args.max_ite, args.thresholds) == (0.05, 9, [0.6, 0.2])
    cfg.write_text("no_such_flag: 1\n")
    with pytest.raises(SystemExit):
        parse_args(["--config", str(cfg)])


@pytest.fixture(scope="module")
def kvasir_root(kvasir_dir, gazemedseg_dir, tmp_path_factory):
    """A handful of real Kvasir images (links) with gaze maps made by the gaze pipeline from the real CSV."""
    from gaze.pipeline import make_gaze_maps

    root = tmp_path_factory.mktemp("kvasir")
    ids = [line.split()[0] for line in (kvasir_dir / "splits" / "val.txt").read_text().splitlines()]
    sizes = {i: Image.open(kvasir_dir / "images" / f"{i}.jpg").size for i in ids[:40]}
    ids = sorted(sizes, key=lambda i: sizes[i][0] * sizes[i][1])[:TRAIN_IDS + TEST_IDS]  # smallest: fast CRF
    for sub in ("images", "masks"):
        (root / sub).mkdir()
        for i in ids:
            (root / sub / f"{i}.jpg").symlink_to(kvasir_dir / sub / f"{i}.jpg")
    (root / "train.txt").write_text("\n".join(ids[:TRAIN_IDS]) + "\n")
    (root / "test.txt").write_text("\n".join(ids[TRAIN_IDS:]) + "\n")
    make_gaze_maps(gazemedseg_dir / "kvasir_fixation.csv", root, "kvasir", ids=ids, workers=1, quiet=True,
                   sheet=False)
    return root


def train(root, exp, *extra):
    assert run.main(["--root", str(root), "--exp_path", str(exp), *TINY, *extra]) in (0, None)
    (run_dir,) = [p for p in (Path(exp) / "0" / "kvasir").iterdir() if p.is_dir()]
    return run_dir


def test_gaze_sup_run_folder_and_test_reproduces_metrics(kvasir_root, tmp_path):
    run_dir = train(kvasir_root, tmp_path / "exp", "--max_ite", "6", "--log_step", "2", "--val_step", "3",
                    "--save_step", "3")
    for name in ("log.txt", "config.yaml", "metrics.json", "losses.csv", "per_image_metrics.csv",
                 "model_latest.pth", "model_best.pth", "model_ite3.pth", "model_ite6.pth"):
        assert (run_dir / name).is_file(), name
    metrics = json.loads((run_dir / "metrics.json").read_text())
    final = metrics["final"]
    assert metrics["final_iteration"] == 6 and final["num_images"] == TEST_IDS
    assert {"mdice", "mdice_std", "miou", "miou_std", "mdice_1", "mdice_2"} <= set(final)
    assert [h["iteration"] for h in metrics["history"]] == [3, 6]
    # --test on the final checkpoint gives the run's final metrics
    assert run.main(["--test", "--ckpt_path", str(run_dir / "model_latest.pth"), "--root", str(kvasir_root),
                     "--exp_path", str(tmp_path / "test"), "--spatial_size", "32", "--num_worker", "0"]) == 0
    (test_dir,) = (tmp_path / "test" / "0" / "kvasir").iterdir()
    tested = json.loads((test_dir / "metrics.json").read_text())["test"]
    for key in ("mdice", "miou", "mdice_1", "mdice_2"):
        assert tested[key] == pytest.approx(final[key], abs=1e-9)


def test_full_sup_trains_and_selects_on_miou(kvasir_root, tmp_path):
    run_dir = train(kvasir_root, tmp_path / "exp", "-m", "full", "--max_ite", "4", "--val_step", "2")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert "miou" in metrics["best"] and "mdice_1" not in metrics["final"]
    assert (run_dir / "model_best.pth").is_file()


def test_resume_continues_exactly(kvasir_root, tmp_path):
    common = ["--max_ite", "8", "--log_step", "1", "--val_step", "4", "--save_step", "4", "--lr_scheduler", "cos",
              "--lr_min", "1e-5"]
    full = train(kvasir_root, tmp_path / "a", *common)
    resumed = train(kvasir_root, tmp_path / "b", *common, "--resume", "--ckpt_path", str(full / "model_ite4.pth"))
    a = (full / "losses.csv").read_text().splitlines()
    b = (resumed / "losses.csv").read_text().splitlines()
    assert b[0] == a[0] and b[1:] == a[5:]  # iterations 5..8, bit for bit
    assert [r.split(",")[0] for r in b[1:]] == ["5", "6", "7", "8"]


def copy_root(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=False)
    return dst


@pytest.mark.parametrize("case", ["unknown_data", "missing_root", "missing_split", "missing_image",
                                  "missing_gaze", "size_mismatch", "corrupt_image"])
def test_bad_input_fails_before_training_naming_the_path(kvasir_root, tmp_path, case):
    root = copy_root(kvasir_root, tmp_path / "root")
    first = (root / "train.txt").read_text().split()[0]
    extra, expect = [], None
    if case == "unknown_data":
        extra, expect = ["--data", "colon"], "colon"
    elif case == "missing_root":
        root, expect = tmp_path / "nowhere", "nowhere"
    elif case == "missing_split":
        (root / "train.txt").unlink()
        expect = "train.txt"
    elif case == "missing_image":
        (root / "images" / f"{first}.jpg").unlink()
        expect = f"{first}.jpg"
    elif case == "missing_gaze":
        (root / "gaze" / "crf_compat1" / f"{first}.jpg").unlink()
        expect = f"{first}.jpg"
    elif case == "size_mismatch":
        test_id = (root / "test.txt").read_text().split()[0]
        Image.fromarray(np.zeros((10, 12), np.uint8)).save(root / "masks" / f"{test_id}.jpg")
        expect = f"{test_id}.jpg"
    elif case == "corrupt_image":
        (root / "images" / f"{first}.jpg").write_bytes(b"not a jpeg at all")
        expect = f"{first}.jpg"
    with pytest.raises(UserError, match=expect.replace(".", r"\.")):
        run.main(["--root", str(root), "--exp_path", str(tmp_path / "exp"), *TINY, "--max_ite", "2", *extra])
    assert not list((tmp_path / "exp").rglob("*.pth"))


def test_test_mode_loads_a_paper_format_checkpoint_without_width_flags(kvasir_root, tmp_path):
    import torch

    from models.segmentation_net import build_model

    model = build_model("gaze_sup", num_levels=2, features=(8, 8, 16, 16, 32, 8), feat_dim=8)
    path = tmp_path / "model_best.pth"
    torch.save({"state_dict": model.state_dict(), "opt": {}, "epoch": 3, "iteration": 100,
                "best_performance": np.float64(0.5), "best_iteration": 100}, path)
    assert run.main(["--test", "--ckpt_path", str(tmp_path), "--root", str(kvasir_root), "--exp_path",
                     str(tmp_path / "exp"), "--spatial_size", "32", "--num_worker", "0"]) == 0
    (test_dir,) = (tmp_path / "exp" / "0" / "kvasir").iterdir()
    assert json.loads((test_dir / "metrics.json").read_text())["test"]["num_images"] == TEST_IDS


@pytest.mark.parametrize("amp", [["--fp16"], ["--amp", "bf16"]])
def test_mixed_precision_trains_and_checkpoints_the_scaler(kvasir_root, tmp_path, amp):
    """The paper's --fp16 crashes (GradScaler.update() is never called); here the scaler steps, updates and
    is saved, so a resumed fp16 run keeps its scale."""
    from models.checkpoint import load_checkpoint

    run_dir = train(kvasir_root, tmp_path / "exp", "--max_ite", "3", "--val_step", "3", *amp)
    ckpt = load_checkpoint(run_dir / "model_latest.pth")
    assert ckpt["iteration"] == 3
    if amp == ["--fp16"]:
        assert ckpt["scaler"]["scale"] > 0 and ckpt["scaler"]["_growth_tracker"] == 3
    assert np.isfinite(json.loads((run_dir / "metrics.json").read_text())["final"]["mdice"])


def test_validation_split_selects_model_best(kvasir_root, tmp_path):
    run_dir = train(kvasir_root, tmp_path / "exp", "--max_ite", "4", "--val_step", "2", "--val_fraction", "0.34")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["best"]["selected_on"] == "val"
    assert all(h["val"]["num_images"] == 2 for h in metrics["history"])  # round(6 * 0.34) held-out ids
    assert metrics["final"]["num_images"] == TEST_IDS  # the test split is still reported
    best = max(metrics["history"], key=lambda h: h["val"]["mdice"])
    assert metrics["best"]["iteration"] == best["iteration"]
