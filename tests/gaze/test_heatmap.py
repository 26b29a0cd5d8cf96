"""gaze.heatmap against the paper's recipe computed directly (Python loop canvas + scipy gaussian_filter)."""
import cv2
import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from gaze.heatmap import (
    blur_fixations,
    fixation_canvas,
    fixation_indices,
    gaze_heatmap,
    heatmap_f32,
    impulse_responses,
    minmax,
    round_half,
    to_uint8,
)

# coordinates at and next to the borders: 0 and 0.5/768 wrap to index -1, 1.5/768 and 2.5/768 test half-to-even
BORDER = [0.0, 0.5 / 768, 1 / 768, 1.5 / 768, 2.5 / 768, 0.5, 1 - 1 / 768, 767.5 / 768, 1.0]


def paper_canvas(f: np.ndarray, size: int = 768) -> np.ndarray:
    """The notebook's loop, verbatim in spirit: Python round, plain += (index -1 wraps)."""
    canvas = np.zeros((size, size), dtype=np.float32)
    for x, y, d in f:
        canvas[round(y * size) - 1, round(x * size) - 1] += d
    return canvas


def paper_heatmap(f: np.ndarray, height: int, width: int, sigma: float) -> np.ndarray:
    h = gaussian_filter(paper_canvas(f), sigma)
    h = (h - h.min()) / (h.max() - h.min())
    return cv2.resize(h, (width, height), interpolation=cv2.INTER_CUBIC)  # float32, before the float16 cast


def random_fixations(rng, k: int, border: bool = True) -> np.ndarray:
    f = np.c_[rng.random(k), rng.random(k), rng.integers(50, 4328, k).astype(float)]
    if border:  # some fixations exactly on / next to the borders, some duplicated pixels
        n = min(k, 6)
        f[:n, 0] = rng.choice(BORDER, n)
        f[:n, 1] = rng.choice(BORDER, n)
        f[-1, :2] = f[0, :2]
    return f


@pytest.mark.parametrize("n", [1, 2, 5, 37, 768])
@pytest.mark.parametrize("sigma", [0.7, 3.0, 20.0, 70.0])
def test_impulse_responses_match_scipy(n, sigma):
    # sigma 20 and 70 give kernels (radius 80, 280) longer than the short axes: repeated reflections
    R = impulse_responses(n, sigma)
    ps = np.unique(np.r_[0, 1, n // 2, n - 2, n - 1].clip(0, n - 1))
    for p in ps:
        impulse = np.zeros(n)
        impulse[p] = 1.0
        np.testing.assert_allclose(R[:, p], gaussian_filter(impulse, sigma, mode="reflect"), rtol=0, atol=1e-15)


def test_index_rule():
    v = np.array(BORDER)
    rows, cols = fixation_indices(v, v[::-1])
    np.testing.assert_array_equal(rows, [(round(y * 768) - 1) % 768 for y in v[::-1]])
    np.testing.assert_array_equal(cols, [(round(x * 768) - 1) % 768 for x in v])
    assert cols[0] == 767 and cols[1] == 767  # x = 0 and 0.5/768: index -1 wraps to the last column
    assert cols[3] == cols[4] == 1  # 1.5 -> 2 and 2.5 -> 2: round half to even
    f = np.c_[v, v[::-1], np.arange(1, len(v) + 1)]
    np.testing.assert_array_equal(fixation_canvas(f), paper_canvas(f))


@pytest.mark.parametrize("seed", range(8))
def test_blur_matches_scipy_small_canvas(seed):
    rng = np.random.default_rng(seed)
    size, sigma = 96, float(rng.uniform(2, 30))  # sigma 30 -> radius 120 > size: kernel wider than the canvas
    f = random_fixations(rng, int(rng.integers(1, 100)))
    ours = blur_fixations(f, sigma, size=size)
    ref = gaussian_filter(paper_canvas(f, size), sigma)
    assert ours.dtype == np.float32
    assert np.abs(ours - ref).max() <= 1e-6 * ref.max()
    assert np.abs(minmax(ours) - minmax(ref)).max() <= 1e-6


@pytest.mark.parametrize("sigma,seed", [(70.0, 0), (50.0, 1)])
@pytest.mark.slow
def test_heatmap_matches_paper_recipe(sigma, seed):
    rng = np.random.default_rng(seed)
    f = random_fixations(rng, 99)
    ours = blur_fixations(f, sigma)
    ref = gaussian_filter(paper_canvas(f), sigma)
    assert np.abs(minmax(ours) - minmax(ref)).max() <= 1e-6
    h, w = 97, 143  # non-square, smaller than the canvas
    ref_map = paper_heatmap(f, h, w, sigma)
    assert np.abs(heatmap_f32(f, h, w, sigma) - ref_map).max() <= 1e-6
    ours16 = gaze_heatmap(f, h, w, sigma)
    assert ours16.dtype == np.float16 and ours16.shape == (h, w)
    ref_u8 = (ref_map.astype(np.float16) * 255).astype(np.uint8)  # the paper's saved values
    diff = np.abs(to_uint8(ours16).astype(int) - ref_u8)
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3  # a 1e-6 difference can only flip a rounding edge


def test_to_uint8_equals_numpy_float16_arithmetic():
    every = np.arange(2 ** 16, dtype=np.uint16).view(np.float16)
    every = every[np.isfinite(every) & (every > -1.5) & (every < 1.5)]  # all float16 values around [0, 1]
    np.testing.assert_array_equal(to_uint8(every), np.clip(every * 255, 0, 255).astype(np.uint8))
    x = np.random.default_rng(0).uniform(-0.01, 1.01, 10 ** 6).astype(np.float32)
    np.testing.assert_array_equal(to_uint8(x), np.clip(x.astype(np.float16) * 255, 0, 255).astype(np.uint8))
    normal = np.abs(x) >= 2.0 ** -14
    np.testing.assert_array_equal(round_half(x)[normal], x.astype(np.float16).astype(np.float32)[normal])


@pytest.mark.parametrize("bad,match", [
    (np.zeros((0, 3)), "non-empty"),
    (np.ones((3, 2)), r"\(K, 3\)"),
    (np.array([[0.5, 1.2, 100.0]]), "outside"),
    (np.array([[-0.1, 0.5, 100.0]]), "outside"),
    (np.array([[0.5, 0.5, 0.0]]), "duration"),
    (np.array([[0.5, np.nan, 10.0]]), "NaN"),
])
def test_bad_fixations_raise(bad, match):
    with pytest.raises(ValueError, match=match):
        gaze_heatmap(bad, 10, 10, 70.0)


@pytest.mark.slow
def test_real_fixations_match_paper_recipe(gazemedseg_dir):
    from gaze.fixations import read_fixations
    for csv, sigma in (("kvasir_fixation.csv", 70.0), ("nci-isbi_fixation.csv", 50.0)):
        fs = next(iter(read_fixations(gazemedseg_dir / csv).values()))
        ref = paper_heatmap(fs.fixations, fs.height, fs.width, sigma)
        ours = heatmap_f32(fs.fixations, fs.height, fs.width, sigma)
        assert np.abs(ours - ref).max() <= 1e-6
        np.testing.assert_array_equal(to_uint8(ours), (ref.astype(np.float16) * 255).astype(np.uint8))
