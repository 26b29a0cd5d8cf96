"""Simulated points and scribbles: never against the mask, every object labelled, reproducible; the label
maps' reading and resizing; the `prepare sparse` command."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from datasets.io import DataError, read_labels
from datasets.segmentation import gaze_targets, resize_labels
from prepare.sparse_labels import (
    IGNORE,
    image_rng,
    label_stats,
    main,
    simulate_points,
    simulate_scribbles,
)
from prepare.synthetic import make_synthetic_dataset


def masks() -> list:
    """Masks that stress the protocols: big and tiny objects, several components, a thin bar, touching
    the border, a full image, an empty one."""
    out = []
    m = np.zeros((120, 150), bool)
    m[20:90, 30:110] = True
    m[100:103, 5:140] = True  # thin bar
    m[5, 145] = True  # one pixel
    out.append(m)
    yy, xx = np.mgrid[:96, :80]
    out.append((yy - 40) ** 2 / 900 + (xx - 10) ** 2 / 400 <= 1)  # ellipse cut by the border
    out.append(np.zeros((40, 50), bool))
    full = np.ones((30, 30), bool)
    out.append(full)
    big = np.zeros((200, 220), bool)
    big[30:180, 40:200] = True  # > 900 px: eroded first
    out.append(big)
    return out


@pytest.mark.parametrize("simulate", [simulate_points, simulate_scribbles])
def test_simulated_labels_never_contradict_the_mask_and_cover_every_object(simulate):
    from scipy import ndimage
    for k, mask in enumerate(masks()):
        labels = simulate(mask, image_rng(3, f"m{k}"))
        assert labels.dtype == np.uint8 and set(np.unique(labels)) <= {0, 1, IGNORE}
        assert not (labels[~mask] == 1).any() and not (labels[mask] == 0).any()
        assert label_stats(labels, mask)["agreement"] in (1.0,) or not (labels != IGNORE).any()
        comp, n = ndimage.label(mask, np.ones((3, 3)))
        for c in range(1, n + 1):  # every connected component carries a foreground label
            assert (labels[comp == c] == 1).any(), (k, c)
        if not mask.all():
            assert (labels == 0).any(), k  # and there is background somewhere
        assert (labels == IGNORE).any() or mask.size < 1000


@pytest.mark.parametrize("simulate", [simulate_points, simulate_scribbles])
def test_simulated_labels_are_reproducible_from_the_seed(simulate):
    yy, xx = np.mgrid[:160, :200]
    mask = ((yy - 70) ** 2 / 2500 + (xx - 80) ** 2 / 1600 <= 1) | ((yy - 100) ** 2 / 400 + (xx - 140) ** 2 / 1600 <= 1)
    a, b = simulate(mask, image_rng(7, "x")), simulate(mask, image_rng(7, "x"))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, simulate(mask, image_rng(8, "x")))


def test_points_are_disks_inside_the_object_away_from_its_edge():
    mask = masks()[4]
    labels = simulate_points(mask, image_rng(0, "p"), count=2, radius=4, margin=10)
    from scipy import ndimage
    depth = ndimage.distance_transform_edt(mask)
    assert depth[labels == 1].min() >= 10 - 4 + 1  # centre >= radius + margin deep, disk of radius 4
    disks, n = __import__("scipy").ndimage.label(labels == 1)
    assert n == 2 and all((disks == k).sum() == 49 for k in (1, 2))  # two disks of radius 4 (49 px each)


def test_resize_labels_keeps_small_labels_and_refuses_conflicts():
    labels = np.full((100, 90), IGNORE, np.uint8)
    labels[10, 10] = 1  # a one-pixel point survives a 10x reduction
    labels[50:52, 50] = 0
    labels[95, 75], labels[96, 76] = 1, 0  # same output cell: both labels -> unlabelled
    small = resize_labels(labels, 10)
    assert small.shape == (1, 10, 10) and small.dtype == torch.uint8
    assert small[0, 1, 1] == 1 and small[0, 5, 5] == 0 and small[0, 9, 8] == IGNORE
    assert int((small != IGNORE).sum()) == 2
    big = resize_labels(labels[:8, :8], 16)  # enlarging: nearest
    assert int((big == 1).sum()) == 0 and int((big == IGNORE).sum()) == 256


def test_gaze_band_marks_the_band_unlabelled():
    gaze = torch.tensor([[[0.1, 0.3, 0.45, 0.5, 0.9]]])
    t = gaze_targets(gaze, [0.5, 0.3], [0.3, 0.2])
    assert t[0].tolist() == [[0, IGNORE, IGNORE, 1, 1]] and t[1].tolist() == [[0, 1, 1, 1, 1]]
    assert torch.equal(gaze_targets(gaze, [0.5]), (gaze >= 0.5).float())


def test_read_labels_names_a_bad_map(tmp_path):
    Image.fromarray(np.array([[0, 1, 255]], np.uint8)).save(tmp_path / "ok.png")
    assert read_labels(tmp_path / "ok.png").tolist() == [[0, 1, 255]]
    Image.fromarray(np.array([[0, 2, 255]], np.uint8)).save(tmp_path / "bad.png")
    with pytest.raises(DataError, match=r"bad.png has value\(s\) \[2\]"):
        read_labels(tmp_path / "bad.png")
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "lossy.jpg")
    with pytest.raises(DataError, match="lossless"):
        read_labels(tmp_path / "lossy.jpg")


@pytest.mark.slow
def test_prepare_sparse_writes_maps_report_and_sheet(tmp_path, capsys):
    root = tmp_path / "data"
    make_synthetic_dataset(root, num_train=6, num_test=2, size_range=(40, 56))
    for kind in ("points", "scribbles"):
        assert main(["--root", str(root), "--kind", kind, "--seed", "1"]) == 0
        ids = (root / "train.txt").read_text().split()
        assert sorted(p.stem for p in (root / "labels" / kind).iterdir()) == sorted(ids)
        report = json.loads((root / "labels" / f"{kind}_report.json").read_text())
        assert report["total"]["images"] == 6 and report["total"]["agreement"] == 1.0
        assert 0 < report["total"]["labelled_fraction"] < 0.5
        assert report["total"]["images_without_foreground_label"] == 0
        assert (root / "labels" / f"{kind}_report.png").stat().st_size > 1000
        rows = (root / "labels" / f"{kind}_report.csv").read_text().splitlines()
        assert rows[0].startswith("id,") and len(rows) == 7
    first = (root / "labels" / "points" / f"{ids[0]}.png").read_bytes()
    capsys.readouterr()
    assert main(["--root", str(root), "--kind", "points"]) == 2  # exists: refused, nothing changed
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "--overwrite" in err[0]
    assert main(["--root", str(root), "--kind", "points", "--seed", "1", "--overwrite", "--no-sheet"]) == 0
    assert (root / "labels" / "points" / f"{ids[0]}.png").read_bytes() == first  # same seed, same map
    assert not list((root / "labels").glob(".*"))  # no temporary folder left
