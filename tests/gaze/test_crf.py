"""gaze.crf: the pydensecrf2 backend wrapper and the dispatcher.

The torch backend is checked against this one in tests/gaze/test_crf_torch.py.
"""
import numpy as np
import pytest

pytest.importorskip("pydensecrf.densecrf", reason="pydensecrf2 is not installed (pip install pydensecrf2==1.1)")

from gaze.crf import crf_refine_pydensecrf, refine, refine_batch  # noqa: E402


def two_region_scene(rng, h: int, w: int, vertical: bool):
    """An image of two flat colours split at 40% of the width (or height) and a noisy heatmap that is
    0.62 on the first region and 0.38 on the second, +-0.2 uniform noise: many pixels are on the wrong
    side of 0.5, and only the colour edge tells where the object is."""
    image = np.zeros((h, w, 3), np.uint8)
    inside = np.zeros((h, w), bool)
    if vertical:
        inside[:, : int(0.4 * w)] = True
    else:
        inside[: int(0.4 * h)] = True
    image[inside] = (200, 60, 40)
    image[~inside] = (40, 90, 180)
    prob = np.where(inside, 0.62, 0.38) + rng.uniform(-0.2, 0.2, (h, w))
    return image, prob.astype(np.float32), inside


def test_without_pairwise_term_output_is_the_clipped_unary_softmax():
    # compat = 0 leaves only the unary: Q1 = max(h, 1e-5) / (max(h, 1e-5) + max(1 - h, 1e-5)) exactly
    rng = np.random.default_rng(0)
    h, w = 23, 37  # non-square: a transposed reshape would scramble the map
    prob = rng.random((h, w)).astype(np.float32)
    prob[0, :5] = [0.0, 1.0, 1e-7, 1 - 1e-7, 0.5]
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    q = crf_refine_pydensecrf(image, prob, compat=0.0)
    p1 = np.clip(prob.astype(np.float64), 1e-5, None)
    p0 = np.clip(1.0 - prob.astype(np.float64), 1e-5, None)
    assert q.dtype == np.float32 and q.shape == (h, w)
    np.testing.assert_allclose(q, p1 / (p0 + p1), rtol=0, atol=1e-6)


@pytest.mark.parametrize("vertical", [True, False])
def test_bilateral_term_follows_the_colour_edge(vertical):
    rng = np.random.default_rng(1)
    image, prob, inside = two_region_scene(rng, 48, 72, vertical)
    wrong_before = ((prob > 0.5) != inside).mean()
    q = crf_refine_pydensecrf(image, prob)  # the paper's settings
    wrong_after = ((q > 0.5) != inside).mean()
    assert wrong_before > 0.15  # expected 0.2
    assert wrong_after < 0.02 * wrong_before
    assert q.min() >= 0 and q.max() <= 1


def test_more_weight_smooths_more():
    rng = np.random.default_rng(2)
    image, prob, inside = two_region_scene(rng, 40, 40, True)
    err = [np.abs(crf_refine_pydensecrf(image, prob, compat=c, n_iter=5) - inside).mean() for c in (0.0, 0.5, 3.0)]
    assert err[0] > err[1] > err[2]


def test_dispatcher_and_batch_equal_direct_call():
    rng = np.random.default_rng(3)
    image, prob, _ = two_region_scene(rng, 30, 44, True)
    direct = crf_refine_pydensecrf(image, prob)
    np.testing.assert_array_equal(refine(image, prob), direct)
    batch = refine_batch([image, image[:20]], [prob, prob[:20]])
    np.testing.assert_array_equal(batch[0], direct)
    np.testing.assert_array_equal(batch[1], crf_refine_pydensecrf(image[:20], prob[:20]))


def test_read_only_inputs_are_accepted():
    rng = np.random.default_rng(4)
    image, prob, _ = two_region_scene(rng, 20, 30, True)
    expected = crf_refine_pydensecrf(image, prob)
    image.flags.writeable = False  # e.g. np.asarray(PIL image)
    prob.flags.writeable = False
    np.testing.assert_array_equal(crf_refine_pydensecrf(image, prob), expected)


@pytest.mark.parametrize("kind", ["size", "dtype", "gray", "range"])
def test_bad_inputs_raise(kind):
    image = np.zeros((10, 12, 3), np.uint8)
    prob = np.full((10, 12), 0.5, np.float32)
    if kind == "size":
        prob, match = prob[:, :11], "10, 11"
    elif kind == "dtype":
        image, match = image.astype(np.float32), "uint8"
    elif kind == "gray":
        image, match = image[..., 0], r"\(H, W, 3\)"
    else:
        prob, match = prob + 1.0, r"\[0, 1\]"
    with pytest.raises(ValueError, match=match):
        crf_refine_pydensecrf(image, prob)


def test_dispatcher_rejects_bad_choices():
    image, prob = np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4), np.float32)
    with pytest.raises(ValueError, match="unknown CRF backend 'dense'"):
        refine(image, prob, backend="dense")
    with pytest.raises(ValueError, match="CPU only"):
        refine(image, prob, backend="pydensecrf", device="cuda")
