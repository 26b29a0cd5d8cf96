"""Dense-CRF refinement of a gaze heatmap (the paper's settings), and the backend dispatcher.

Two labels (background, gaze). Unary = -log [1 - h, h] with probabilities clipped at 1e-5 (as
pydensecrf.utils.unary_from_softmax); one bilateral Potts term (sxy 80, srgb 13, compat 1), no
Gaussian term; 10 mean-field iterations; the output is the marginal of label 1.

Backends: "pydensecrf" (the C++ code of Kraehenbuehl & Koltun via the pydensecrf2 fork) and "torch"
(gaze.crf_torch, a PyTorch port of the same permutohedral lattice, CPU or CUDA, imported lazily).
"""
import numpy as np

BACKENDS = ("pydensecrf", "torch")
PAPER = dict(sxy=80.0, srgb=13.0, compat=1.0, n_iter=10)  # the paper's settings (also in configs/data/*.yaml)


def check_inputs(image: np.ndarray, prob: np.ndarray) -> None:
    """Raise ValueError unless image is (H, W, 3) uint8 and prob is (H, W) with values in [0, 1]."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"CRF image must be (H, W, 3) uint8; got {image.shape} {image.dtype}")
    if prob.shape != image.shape[:2]:
        raise ValueError(f"CRF probability map is {prob.shape} but the image is {image.shape[:2]}")
    if not np.isfinite(prob).all() or prob.min() < 0 or prob.max() > 1:
        raise ValueError(f"CRF probabilities must lie in [0, 1]; got range [{prob.min()}, {prob.max()}]")


def crf_refine_pydensecrf(image: np.ndarray, prob: np.ndarray, sxy: float = 80.0, srgb: float = 13.0,
                          compat: float = 1.0, n_iter: int = 10) -> np.ndarray:
    """Mean-field dense CRF with pydensecrf2; returns the label-1 marginal, float32 (H, W).

    Args:
        image: RGB uint8 (H, W, 3), the colour features of the bilateral kernel.
        prob: foreground probability (H, W) in [0, 1] (the gaze heatmap).
        sxy, srgb: bilateral kernel widths in pixels and intensity levels.
        compat: Potts weight of the bilateral term.
        n_iter: mean-field iterations.
    """
    try:
        import pydensecrf.densecrf as dcrf
        from pydensecrf.utils import unary_from_softmax
    except ImportError as e:
        raise ImportError("the pydensecrf backend needs `pip install pydensecrf2==1.1` "
                          "(or use the torch backend)") from e
    prob = np.asarray(prob, dtype=np.float32)
    check_inputs(image, prob)
    h, w = prob.shape
    d = dcrf.DenseCRF2D(w, h, 2)
    d.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(np.stack([1.0 - prob, prob]))))  # clip 1e-5
    d.addPairwiseBilateral(sxy=sxy, srgb=srgb, rgbim=np.require(image, np.uint8, ["C", "W"]), compat=compat)
    q = np.asarray(d.inference(int(n_iter)), dtype=np.float32).reshape(2, h, w)
    return q[1]


def refine(image: np.ndarray, prob: np.ndarray, backend: str = "pydensecrf", device: str = "cpu", **kw) -> np.ndarray:
    """CRF-refine one heatmap with the chosen backend; kwargs as crf_refine_pydensecrf (paper defaults)."""
    if backend == "pydensecrf":
        if device != "cpu":
            raise ValueError(f"the pydensecrf backend runs on the CPU only; got device {device!r}")
        return crf_refine_pydensecrf(image, prob, **kw)
    if backend == "torch":
        from gaze.crf_torch import crf_refine_torch
        return crf_refine_torch(image, prob, device=device, **kw)
    raise ValueError(f"unknown CRF backend {backend!r}; choose one of {BACKENDS}")


def refine_batch(images: list, probs: list, backend: str = "pydensecrf", device: str = "cpu", **kw) -> list:
    """CRF-refine several heatmaps; the torch backend processes them together (one GPU batch)."""
    if backend == "torch":
        from gaze.crf_torch import crf_refine_torch_batch
        return crf_refine_torch_batch(images, probs, device=device, **kw)
    return [refine(im, p, backend, device, **kw) for im, p in zip(images, probs)]
