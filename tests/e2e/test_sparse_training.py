"""sparse_sup and the gaze uncertain band train end to end; --test, --resume and predict work on their runs;
their flag errors are one line."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import run
from engine.predict import main as predict_main
from models.checkpoint import load_checkpoint
from prepare.sparse_labels import make_sparse_labels
from tests.helpers import one_error_line, only_run_dir, tiny_argv, tiny_dataset

pytestmark = pytest.mark.usefixtures("one_thread")
FLAGS = ["--spatial_size", "32", "--max_ite", "4", "--log_step", "2", "--val_step", "2", "--save_step", "2",
         "--quiet"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """Its own tiny dataset (the session's is read-only) with simulated scribbles in ROOT/labels/scribbles."""
    root = tiny_dataset(tmp_path_factory.mktemp("data"))
    make_sparse_labels(root, "scribbles", sheet=False)
    return root


def cli_error(capsys, argv) -> str:
    capsys.readouterr()
    assert run.cli(argv) == 2
    return one_error_line(capsys.readouterr().err)


@pytest.mark.slow
def test_sparse_sup_trains_tests_resumes_and_predicts(data_root, tmp_path):
    exp = tmp_path / "exp"
    assert run.cli(tiny_argv(data_root, exp, "-m", "sparse_sup", "--label_dir", "scribbles", *FLAGS)) == 0
    run_dir = only_run_dir(exp)
    assert run_dir.name.startswith("sparse_scribbles_2levels")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "finished" and "mdice" in metrics["final"]
    losses = (run_dir / "losses.csv").read_text().splitlines()
    assert losses[0].split(",")[2:] == ["loss_seg_1", "loss_seg_2", "loss_cons", "loss"]
    assert all(np.isfinite(float(v)) for v in losses[-1].split(",")[2:])
    assert load_checkpoint(run_dir / "model_latest.pth")["args"]["method"] == "sparse_sup"
    # --test: a folder beside the run, the same final metrics
    assert run.cli(["--test", "--ckpt_path", str(run_dir / "model_latest.pth"), "--quiet"]) == 0
    tested = next(p for p in run_dir.parent.iterdir() if "_test_" in p.name)
    assert json.loads((tested / "metrics.json").read_text())["test"]["mdice"] == metrics["final"]["mdice"]
    # --resume with a higher --max_ite continues in place
    assert run.cli(["--resume", "--ckpt_path", str(run_dir), "--max_ite", "6", "--quiet"]) == 0
    assert json.loads((run_dir / "metrics.json").read_text())["final_iteration"] == 6
    # predict
    image = sorted((data_root / "images").glob("*.jpg"))[0]
    out = tmp_path / "pred"
    assert predict_main(["--ckpt_path", str(run_dir), "--input", str(image), "--out", str(out), "--quiet"]) == 0
    pred = np.asarray(Image.open(out / f"{image.stem}_mask.png"))
    assert pred.shape == np.asarray(Image.open(image)).shape[:2]


@pytest.mark.slow
def test_gaze_band_trains_with_unlabelled_pixels(data_root, tmp_path):
    exp = tmp_path / "exp"
    assert run.cli(tiny_argv(data_root, exp, "--ignore_below", "0.3,0.2", *FLAGS)) == 0
    run_dir = only_run_dir(exp)
    assert run_dir.name.endswith("_band") or "_band_" in run_dir.name
    assert load_checkpoint(run_dir / "model_latest.pth")["args"]["ignore_below"] == [0.3, 0.2]
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "finished"
    assert run.cli(["--test", "--ckpt_path", str(run_dir), "--quiet"]) == 0  # the recorded band passes the checks


@pytest.mark.slow
def test_a_training_image_without_labels_is_an_error_naming_it(data_root, tmp_path, capsys):
    bad = data_root / "labels" / "empty"
    bad.mkdir(parents=True, exist_ok=True)
    for p in (data_root / "labels" / "scribbles").glob("*.png"):
        labels = np.asarray(Image.open(p)).copy()
        if p.stem == (data_root / "train.txt").read_text().split()[2]:
            labels[:] = 255
        Image.fromarray(labels).save(bad / p.name)
    line = cli_error(capsys, tiny_argv(data_root, tmp_path / "exp", "-m", "sparse_sup", "--label_dir", "empty",
                                       "--preload", "yes", *FLAGS))
    name = (data_root / "train.txt").read_text().split()[2]
    assert f"{name}.png: no labelled pixel" in line
    assert not (tmp_path / "exp").exists() or not any((tmp_path / "exp").rglob("*.pth"))


@pytest.mark.parametrize("flags, expect", [
    (["--ignore_below", "0.5,0.2"], "--ignore_below [0.5, 0.2]: each value must be >= 0 and below its level's "
                                    "threshold (thresholds [0.5, 0.3]); got 0.5 >= 0.5"),
    (["--ignore_below", "0.3"], "--ignore_below [0.3]: expected 2 value(s), one per level"),
    (["--num_levels", "1", "--ignore_below", "0.6"], "got 0.6 >= 0.5"),
    (["-m", "full_sup", "--ignore_below", "0.3"], "--ignore_below is for -m gaze_sup"),
    (["-m", "sparse_sup"], "-m sparse_sup needs --label_dir"),
    (["--label_dir", "points"], "--label_dir is for -m sparse_sup, not -m gaze_sup"),
    (["-m", "sparse_sup", "--label_dir", "../x"], "--label_dir '../x': expected a folder name"),
    (["-m", "sparse_sup", "--label_dir", "nothing"], "sparse label map not found"),
])
def test_flag_errors_are_one_line(flags, expect, data_root, tmp_path, capsys):
    line = cli_error(capsys, tiny_argv(data_root, tmp_path / "exp", *flags, *FLAGS))
    assert expect in line, line


def test_sparse_targets_are_the_label_map_on_every_level(data_root):
    from datasets.segmentation import SegmentationDataset
    ds = SegmentationDataset(data_root, "kvasir", "train", train=True, method="sparse_sup", spatial_size=32,
                             label_dir="scribbles", num_levels=2)
    target = ds[0]["target"]
    assert target.shape == (2, 32, 32) and torch.equal(target[0], target[1])
    assert set(target.unique().tolist()) <= {0.0, 1.0, 255.0} and (target == 1).any() and (target == 0).any()
