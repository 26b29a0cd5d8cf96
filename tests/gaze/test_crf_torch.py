"""gaze.crf_torch against the C++ dense CRF it ports (pydensecrf2), on random and real Kvasir images."""
import numpy as np
import pytest
import torch
from PIL import Image

from gaze.crf_torch import build_lattice, crf_refine_torch, crf_refine_torch_batch, mean_field

dcrf = pytest.importorskip("pydensecrf.densecrf", reason="pydensecrf2==1.1 is the oracle of these tests")
from pydensecrf.utils import unary_from_softmax  # noqa: E402

# The port repeats the C++ float32 operations in the same order; what is left is libm vs Eigen exp/log
# (about 1 ulp). The issue asks for <= 1e-4; we hold the CPU to 1e-6 (measured: 1.2e-7).
TOL = 1e-6


def oracle(image, prob, n_iter=10, sxy=80.0, srgb=13.0, compat=1.0):
    """The paper's CRF with pydensecrf2: label-1 marginal."""
    h, w = prob.shape
    d = dcrf.DenseCRF2D(w, h, 2)
    d.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(np.stack([1 - prob, prob]), clip=1e-5)))
    d.addPairwiseBilateral(sxy=sxy, srgb=srgb, rgbim=np.array(image, order="C"), compat=compat)
    return np.asarray(d.inference(n_iter))[1].reshape(h, w)


def random_case(h, w, seed, lo=0, hi=256):
    rng = np.random.default_rng(seed)
    image = rng.integers(lo, hi, (h, w, 3), dtype=np.uint8)
    return image, rng.random((h, w), dtype=np.float32)


def blob_prob(h, w, cx=0.45, cy=0.55, sigma=0.2):
    """A gaze-heatmap-like probability map, quantised to /255 as the pipeline reads it back."""
    ys, xs = np.mgrid[0:h, 0:w]
    p = np.exp(-((xs - cx * w) ** 2 + (ys - cy * h) ** 2) / (2 * (sigma * min(h, w)) ** 2))
    return (np.floor(p * 255) / 255).astype(np.float32)


@pytest.mark.parametrize("h,w", [(1, 1), (1, 37), (29, 1), (5, 9), (17, 23), (64, 48)])
@pytest.mark.parametrize("n_iter", [0, 1, 10])
def test_matches_pydensecrf_random(h, w, n_iter):
    image, prob = random_case(h, w, seed=h * 1000 + w)
    assert np.abs(crf_refine_torch(image, prob, n_iter=n_iter) - oracle(image, prob, n_iter)).max() <= TOL


@pytest.mark.parametrize("sxy,srgb,compat", [(3.0, 5.0, 1.0), (1.0, 2.0, 2.5), (0.7, 0.9, 1.0), (200.0, 60.0, 4.0)])
def test_matches_pydensecrf_other_parameters(sxy, srgb, compat):
    # Small kernels make a lattice with thousands of vertices (0.7/0.9 also takes the row-wise unique path).
    image, prob = random_case(37, 45, seed=7)
    got = crf_refine_torch(image, prob, sxy=sxy, srgb=srgb, compat=compat, n_iter=5)
    want = oracle(image, prob, 5, sxy, srgb, compat)
    assert np.abs(got - want).max() <= TOL
    assert np.abs(want - prob).max() > 0.01  # the CRF did change the map: the comparison is not vacuous


@pytest.mark.parametrize("h,w,seed", [(5, 5, 1), (3, 7, 2), (5, 5, 4)])
def test_sse_padding_vertices(h, w, seed):
    # The C++ (SSE path) also inserts the lattice vertices of zero "padding" features when H*W % 4 != 0;
    # they get no value but relay the blur. With dark images and wide kernels they sit next to real
    # vertices: leaving them out changes these cases by 1e-3 to 4e-3 (checked by mutation).
    image, prob = random_case(h, w, seed, hi=128)
    assert np.abs(crf_refine_torch(image, prob, sxy=4.0, srgb=80.0) - oracle(image, prob, 10, 4.0, 80.0)).max() <= TOL


@pytest.mark.parametrize("h,w,seed", [(4, 4, 0), (2, 6, 1), (4, 4, 2)])
def test_rank_ties(h, w, seed):
    # A black top-left pixel has feature 0: all its elevated coordinates tie, and the C++ pairwise count
    # decides its zero-weight simplex corners. Breaking ties the other way changes these by 1e-3 to 2e-2.
    image, prob = random_case(h, w, seed, hi=128)
    image[0, 0] = 0
    assert np.abs(crf_refine_torch(image, prob, sxy=4.0, srgb=80.0) - oracle(image, prob, 10, 4.0, 80.0)).max() <= TOL


@pytest.mark.parametrize("d", [2, 3, 7])
def test_lattice_other_dimensions(d):
    # The lattice is written for any feature dimension: check it through DenseCRF.addPairwiseEnergy.
    rng = np.random.default_rng(d)
    n = 203
    feats = (rng.random((d, n)) * 6).astype(np.float32)
    prob = rng.random((2, n)).astype(np.float32)
    unary = np.ascontiguousarray(unary_from_softmax(prob / prob.sum(0), clip=1e-5))
    crf = dcrf.DenseCRF(n, 2)
    crf.setUnaryEnergy(unary)
    crf.addPairwiseEnergy(np.ascontiguousarray(feats), compat=3.0)
    want = np.asarray(crf.inference(3))
    got = mean_field(build_lattice(torch.from_numpy(feats.T.copy()), [n]), torch.from_numpy(unary), 3.0, 3)
    assert np.abs(got.numpy() - want).max() <= TOL


def smallest_kvasir_ids(kvasir_dir, k):
    sizes = []
    for path in sorted((kvasir_dir / "images").glob("*.jpg")):
        with Image.open(path) as im:
            sizes.append((im.size[0] * im.size[1], path))
    return [p for _, p in sorted(sizes)[:k]]


@pytest.mark.slow
def test_matches_pydensecrf_real_kvasir(kvasir_dir):
    for path in smallest_kvasir_ids(kvasir_dir, 2):  # 332x487 and 401x415: real size, no resizing
        image = np.asarray(Image.open(path).convert("RGB"))
        prob = blob_prob(*image.shape[:2])
        want = oracle(image, prob)
        assert np.abs(crf_refine_torch(image, prob) - want).max() <= TOL, path.name
        assert np.abs(want - prob).max() > 0.05


def test_batch_equals_single():
    cases = [random_case(13, 17, 1), random_case(8, 31, 2), random_case(1, 5, 3)]
    images, probs = [c[0] for c in cases], [c[1] for c in cases]
    singles = [crf_refine_torch(im, p, sxy=5.0) for im, p in cases]
    for batch_pixels in (10 ** 9, 300):  # one shared lattice; several groups
        batch = crf_refine_torch_batch(images, probs, sxy=5.0, batch_pixels=batch_pixels)
        assert [b.shape for b in batch] == [p.shape for p in probs]
        for b, s in zip(batch, singles):
            np.testing.assert_array_equal(b, s)
    assert crf_refine_torch_batch([], []) == []


def test_float64_filtering_close():
    image, prob = random_case(30, 40, 5)
    got = crf_refine_torch(image, prob, dtype=torch.float64)
    assert got.dtype == np.float32
    assert np.abs(got - oracle(image, prob)).max() <= 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_matches_pydensecrf_cuda():
    # CUDA float atomics sum in another order than the C++, so allow a little more than on the CPU
    # (measured on an H200 against saved pydensecrf2 maps of real Kvasir images: 3e-7).
    for h, w in [(1, 9), (45, 61), (240, 320)]:
        image, prob = random_case(h, w, seed=h)
        prob = np.maximum(prob, blob_prob(h, w))
        want = oracle(image, prob)
        assert np.abs(crf_refine_torch(image, prob, device="cuda") - want).max() <= 1e-5
        batch = crf_refine_torch_batch([image, image[:, ::-1]], [prob, prob[:, ::-1]], device="cuda")
        assert np.abs(batch[0] - want).max() <= 1e-5


@pytest.mark.parametrize("image,prob,match", [
    (np.zeros((4, 5, 3), np.float32), np.zeros((4, 5), np.float32), "uint8"),
    (np.zeros((4, 5), np.uint8), np.zeros((4, 5), np.float32), r"\(H, W, 3\)"),
    (np.zeros((4, 5, 3), np.uint8), np.zeros((5, 4), np.float32), r"prob has shape \(5, 4\)"),
    (np.zeros((4, 5, 3), np.uint8), np.full((4, 5), 1.5, np.float32), r"max 1.5"),
    (np.zeros((4, 5, 3), np.uint8), np.full((4, 5), np.nan, np.float32), "20 non-finite"),
    (np.zeros((0, 5, 3), np.uint8), np.zeros((0, 5), np.float32), "empty"),
])
def test_bad_inputs(image, prob, match):
    with pytest.raises(ValueError, match=match):
        crf_refine_torch(image, prob)


def test_bad_batch_names_the_image():
    good = random_case(3, 4, 0)
    with pytest.raises(ValueError, match="image 1: prob has shape"):
        crf_refine_torch_batch([good[0], good[0]], [good[1], good[1].T])
    with pytest.raises(ValueError, match="2 images but 1 prob"):
        crf_refine_torch_batch([good[0], good[0]], [good[1]])
    with pytest.raises(ValueError, match="sxy > 0"):
        crf_refine_torch(good[0], good[1], sxy=0)
