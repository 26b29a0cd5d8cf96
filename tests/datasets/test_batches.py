"""The preloaded data path (decode + resize once, flip per batch) yields exactly the batches of the
per-sample pipeline (decode + resize every step), and the schedule follows the paper's formulas."""
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from datasets.batches import TrainBatches, epoch_permutation, iteration_flips
from datasets.segmentation import SegmentationDataset
from engine.train import lr_at_epoch
from prepare.synthetic import make_synthetic_dataset


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    make_synthetic_dataset(root, num_train=7, num_test=2, seed=3)
    (root / "gaze" / "crf_compat1").mkdir(parents=True)
    rng = np.random.RandomState(0)
    for mask in (root / "masks").glob("*.jpg"):  # any gray map of the right size will do here
        w, h = Image.open(mask).size
        Image.fromarray((rng.rand(h, w) * 255).astype(np.uint8)).save(root / "gaze" / "crf_compat1" / mask.name)
    return root


def dataset(root, method="gaze_sup"):
    return SegmentationDataset(root, "kvasir", "train", train=True, method=method, spatial_size=24,
                               thresholds=[0.5, 0.3])


@pytest.mark.parametrize("method", ["gaze_sup", "full_sup"])
@pytest.mark.slow
def test_preloaded_batches_equal_per_sample_pipeline(synthetic_root, method):
    ds = dataset(synthetic_root, method)
    pre = TrainBatches(ds, batch_size=3, seed=5, device="cpu", preload=True)
    streamed = TrainBatches(ds, batch_size=3, seed=5, device="cpu", preload=False, num_workers=2)
    assert len(pre) == len(streamed) == math.ceil(7 / 3)
    for epoch in (1, 2):
        first = (epoch - 1) * len(pre) + 1
        a, b = list(pre.epoch(epoch, first)), list(streamed.epoch(epoch, first))
        assert [x[0] for x in a] == [x[0] for x in b] == list(range(first, first + len(pre)))
        for (_, xa, ya), (_, xb, yb) in zip(a, b):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_batches_are_the_flipped_samples(synthetic_root):
    ds = dataset(synthetic_root)
    pre = TrainBatches(ds, batch_size=4, seed=1, device="cpu", preload=True)
    perm = epoch_permutation(len(ds), 1, 2)
    it, images, targets = next(pre.epoch(2, first_iteration=3))
    flips = iteration_flips(4, 1, it)
    for k in range(4):
        sample = ds[int(perm[k])]
        x, y = sample["image"], sample["target"]
        dims = [d for d, f in zip((-2, -1), flips[k].tolist()) if f]
        if dims:
            x, y = x.flip(dims), y.flip(dims)
        assert torch.equal(images[k], x) and torch.equal(targets[k], y)
    assert set(targets.unique().tolist()) <= {0.0, 1.0}


def test_resumed_epoch_continues_with_the_same_batches(synthetic_root):
    pre = TrainBatches(dataset(synthetic_root), batch_size=2, seed=0, device="cpu", preload=True)
    full = list(pre.epoch(3, first_iteration=9))
    tail = list(pre.epoch(3, first_iteration=9, start_step=2))
    assert [t[0] for t in tail] == [t[0] for t in full[2:]]
    assert all(torch.equal(a[1], b[1]) for a, b in zip(full[2:], tail))


def test_cosine_schedule_matches_the_formula():
    args = SimpleNamespace(lr=1e-2, lr_min=1e-4, lr_scheduler="cos", warmup_ite=0)
    total = 15000 // 110 + 1
    for epoch in (1, 2, 68, total):
        counter = max(epoch - 1, 1)  # the authors' loop: epochs 1 and 2 at lr(1), epoch k at lr(k - 1)
        expected = 1e-4 + (1e-2 - 1e-4) * 0.5 * (1 + math.cos(math.pi * counter / total))
        assert lr_at_epoch(args, epoch, total) == pytest.approx(expected, rel=1e-12)
    args.warmup_ite = 5
    assert lr_at_epoch(args, 3, total) == pytest.approx(1e-2 * 2 / 5)
    args.lr_scheduler = "none"
    assert lr_at_epoch(args, 7, total) == 1e-2


def test_preload_auto_keeps_the_set_only_when_it_fits(synthetic_root):
    from engine.train import available_memory, preload_fits

    ds = dataset(synthetic_root)
    need = len(ds) * 24 * 24 * (4 * 3 + 2)  # float32 RGB images + one uint8 pseudo-mask per level
    cpu = torch.device("cpu")
    assert preload_fits(ds, cpu, share=0.5, available=2 * need)
    assert not preload_fits(ds, cpu, share=0.5, available=2 * need - 1)
    assert available_memory(cpu) > 0
