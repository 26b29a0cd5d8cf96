"""Which files a prepared dataset needs, the compact copy for GPU sessions, and spec files given as paths."""
from pathlib import Path

import pytest
import torch

import run
from common.dataspec import BUILTIN_DIR
from datasets.io import DataError, read_ids
from datasets.segmentation import SegmentationDataset
from scripts.prepare_kvasir_compact import build
from scripts.prepare_kvasir_compact import main as compact_main
from tests.helpers import tiny_argv, tiny_dataset


@pytest.fixture
def no_train_masks(tmp_path) -> Path:
    """A tiny dataset whose training ids have images and gaze maps only (no masks)."""
    root = tiny_dataset(tmp_path / "data", num_train=6, num_test=2)
    for i in read_ids(root / "train.txt"):
        (root / "masks" / f"{i}.jpg").unlink()
    return root


def test_gaze_training_split_needs_no_masks(no_train_masks):
    root = no_train_masks
    train = SegmentationDataset(root, "kvasir", "train", train=True, spatial_size=32, thresholds=[0.5, 0.3])
    item = train[0]
    assert item["target"].shape == (2, 32, 32) and item["target"].sum() > 0
    with pytest.raises(DataError, match="mask not found: .*synth0000.jpg"):
        SegmentationDataset(root, "kvasir", "train", train=True, method="full_sup", spatial_size=32)
    with pytest.raises(DataError, match="mask not found"):  # test mode (test split, --val_fraction ids) reads masks
        SegmentationDataset(root, "kvasir", "train", train=False, spatial_size=32)
    assert len(SegmentationDataset(root, "kvasir", "test", train=False, spatial_size=32)) == 2


@pytest.mark.slow
def test_training_and_testing_without_training_masks(no_train_masks, tmp_path, one_thread):
    flags = ["--max_ite", "1", "--val_step", "1", "--save_step", "100", "--quiet"]
    assert run.main(tiny_argv(no_train_masks, tmp_path / "exp", *flags)) == 0
    # --val_fraction holds out training ids for validation: those need masks, and the error names one
    with pytest.raises(DataError, match=r"mask not found: .*/masks/synth000\d.jpg"):
        run.main(tiny_argv(no_train_masks, tmp_path / "exp2", *flags, "--val_fraction", "0.34"))


def test_compact_copy_is_built_from_the_prepared_root(no_train_masks, tmp_path, capsys):
    root, out = no_train_masks, tmp_path / "compact"
    (root / "gaze" / "heatmap").mkdir()  # not carried unless asked for
    counts = build(root, out)
    train, test = read_ids(root / "train.txt"), read_ids(root / "test.txt")
    assert counts["train"] == 6 and counts["test"] == 2 and counts["files"] == 8 + 2 + 6
    expected = ({f"images/{i}.jpg" for i in train + test} | {f"masks/{i}.jpg" for i in test}
                | {f"gaze/crf_compat1/{i}.jpg" for i in train} | {"train.txt", "test.txt"})
    assert {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()} == expected
    for rel in expected - {"train.txt", "test.txt"}:
        assert not (out / rel).is_symlink() and (out / rel).read_bytes() == (root / rel).read_bytes()
    assert read_ids(out / "train.txt") == train and read_ids(out / "test.txt") == test
    # the copy trains like the original
    assert SegmentationDataset(out, "kvasir", "train", train=True, spatial_size=32)[0]["target"].shape[0] == 1
    # missing gaze maps: one line naming the folder and the fix; nothing copied
    assert compact_main(["--root", str(root), "--out", str(tmp_path / "c2"), "--gaze_dir", "box"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "6 file(s) missing" in err and "gaze/box/synth0000.jpg" in err
    assert not (tmp_path / "c2").exists()
    assert compact_main(["--root", str(root), "--out", str(root / "inside")]) == 2
    assert "is inside --root" in capsys.readouterr().err


@pytest.mark.slow
def test_spec_file_path_gives_the_same_gaze_maps_and_tensors_as_the_name(kvasir_dir, gazemedseg_dir, tmp_path):
    """Real images and fixations: --data configs/data/kvasir.yaml and --data kvasir write byte-identical gaze
    maps and read identical training and test tensors."""
    from gaze.pipeline import make_gaze_maps

    ids = read_ids(kvasir_dir / "splits" / "train.txt")[:3]
    path = str(BUILTIN_DIR / "kvasir.yaml")
    roots = {}
    for data in ("kvasir", path):
        root = roots[data] = tmp_path / ("name" if data == "kvasir" else "path")
        for sub in ("images", "masks"):
            (root / sub).mkdir(parents=True)
            for i in ids:
                (root / sub / f"{i}.jpg").symlink_to(kvasir_dir / sub / f"{i}.jpg")
        make_gaze_maps(gazemedseg_dir / "kvasir_fixation.csv", root, data, steps=["heatmap"], workers=1,
                       quiet=True, sheet=False, report=False, ids=ids)
    for i in ids:
        assert (roots["kvasir"] / "gaze" / "heatmap" / f"{i}.jpg").read_bytes() == \
            (roots[path] / "gaze" / "heatmap" / f"{i}.jpg").read_bytes()
    for train in (True, False):
        by_name = SegmentationDataset(roots["kvasir"], "kvasir", ids, train=train, spatial_size=64,
                                      thresholds=[0.5, 0.3], gaze_dir="heatmap")
        by_path = SegmentationDataset(roots[path], path, ids, train=train, spatial_size=64, thresholds=[0.5, 0.3],
                                      gaze_dir="heatmap")
        for k in range(len(ids)):
            a, b = by_name[k], by_path[k]
            assert a.keys() == b.keys()
            for key in a:
                if isinstance(a[key], torch.Tensor):
                    assert torch.equal(a[key], b[key]), (train, key)
                else:
                    assert a[key] == b[key]
