"""Feature propagation: each pixel's feature becomes an affinity-weighted mean of its
25 neighbours in a 5x5 window at dilation 2 (the paper's `prop` consistency).

    corr_n[p] = <F[p], F[p + d_n]>             (0 where p + d_n is outside the image)
    A[p]      = softmax_n(max(corr_n[p], 0))   (outside neighbours still get weight e^0)
    out[p]    = sum_n A_n[p] * F[p + d_n]

The paper's code builds this with unfold(kernel_size=5, dilation=2, padding=4) + einsum,
which materialises a (B, C*25, H*W) tensor and keeps it for the backward pass. Here a custom
autograd Function loops over the 25 shifted views of one zero-padded copy of F and saves only
F and the (B, 25, H, W) correlations; the backward pass recomputes the shifted products. Offsets
d and -d see the same pairs, so only 13 of the 25 correlations are dot products over C.

Precision: the correlations, the softmax and all sums are computed in float32 (float64 for
float64 inputs), whatever the input dtype or autocast state; the output and the gradient come
back in the input dtype. So bf16/fp16 features (autocast) work and stay cheap to save. Attention
weights below the smallest normal float are flushed to 0 (see `_attention`).

The implementation is chosen by name where the model is built (`build_model(..., propagation=...)`,
the `--propagation` flag), through `propagation_function`: "torch" is this module's function (any
device, any float dtype; the default), "triton" the fused kernels in models/feature_propagation_triton.py
(CUDA, float16/bfloat16/float32; imported only when selected, so CPU-only installs never need triton).
"""
import importlib.util
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from common.errors import UserError

PROPAGATIONS = ("torch", "triton")
Propagation = Callable[[torch.Tensor], torch.Tensor]

OFFSETS = (-4, -2, 0, 2, 4)
PAD = 4
# Row-major neighbour offsets (dy, dx); n = 12 is the centre. Offset n and 24 - n are opposite.
NEIGHBOURS = tuple((dy, dx) for dy in OFFSETS for dx in OFFSETS)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _view(padded: torch.Tensor, dy: int, dx: int, H: int, W: int) -> torch.Tensor:
    """View X[p + (dy, dx)] of a map zero-padded by PAD (no copy)."""
    return padded[:, :, PAD + dy:PAD + dy + H, PAD + dx:PAD + dx + W]


def _pad(x: torch.Tensor) -> torch.Tensor:
    return F.pad(x, (PAD,) * 4)


def _attention(corr: torch.Tensor) -> torch.Tensor:
    """softmax_n(max(corr_n, 0)); weights below the smallest normal float are set to 0. Such a weight
    cannot change an output above ~1e-31, and denormal arithmetic is several times slower on CPUs
    (large correlations make most of the 25 weights e^-100 or so)."""
    attn = torch.softmax(corr.clamp(min=0), dim=1)
    return attn.masked_fill_(attn < torch.finfo(attn.dtype).tiny, 0)


def _from_other_end(maps: torch.Tensor, ns=range(25)) -> torch.Tensor:
    """Per-pair maps read at the pair's other end: O_n[p] = maps_{24-n}[p + d_n], for n in ns (0 outside).
    The pair (p, p + d_n) is the pair (p + d_n, p) of the opposite offset 24 - n.

    Args:
        maps: (B, 25, H, W), channel n for neighbour n.
    Returns:
        (B, len(ns), H, W).
    """
    H, W = maps.shape[-2:]
    mp = _pad(maps)
    return torch.cat([_view(mp[:, 24 - n:25 - n], *NEIGHBOURS[n], H, W) for n in ns], 1)


def propagation_forward(feature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward math, no autograd.

    Args:
        feature: (B, C, H, W), any float dtype.
    Returns:
        out (B, C, H, W) in feature's dtype, corr (B, 25, H, W) in the accumulation dtype.
    """
    B, _, H, W = feature.shape
    fp = _pad(feature.to(_acc_dtype(feature.dtype)))
    f = _view(fp, 0, 0, H, W)  # padded once, in the accumulation dtype; f is its centre
    shifted = [_view(fp, dy, dx, H, W) for dy, dx in NEIGHBOURS]
    corr = fp.new_zeros(B, 25, H, W)
    product = torch.empty_like(f)  # reused: fresh large buffers cost page faults on CPU
    for n in range(13):  # offsets 0..11 and the centre; 13..24 are the same pairs from the other end
        corr[:, n] = torch.mul(f, shifted[n], out=product).sum(1)
    del product  # before `out` exists: the peak stays one temporary
    corr[:, 13:] = _from_other_end(corr, range(13, 25))
    attn = _attention(corr)
    out = torch.zeros_like(feature, dtype=fp.dtype)
    for n, s in enumerate(shifted):
        out.addcmul_(s, attn[:, n:n + 1])
    return out.to(feature.dtype), corr


def propagation_backward(feature: torch.Tensor, corr: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """Backward math: dL/dF given dL/dout, recomputing the shifted products.

    Each neighbour pair (p, q = p + d_n) appears three times: F[p] receives dcorr_n[p] * F[q]
    (its side of the dot product), F[q] receives A_n[p] * G[p] (value path) and
    dcorr_n[p] * F[p] (its side of the dot product). The last two are gathered at q from
    p = q - d_n through zero-padded A, dcorr, G and F: outside the image they are zero,
    which drops the pairs whose p lies in the padding. Both dot-product sides multiply a
    neighbour of F, so they share one pass per offset: F[p] gets
    (dcorr_n[p] + dcorr_{24-n}[p + d_n]) * F[p + d_n].

    Args:
        feature: (B, C, H, W) saved input, any float dtype.
        corr: (B, 25, H, W) saved correlations (before the clamp), accumulation dtype.
        grad_out: (B, C, H, W) gradient of the output.
    Returns:
        (B, C, H, W) gradient of the input, in feature's dtype.
    """
    H, W = feature.shape[-2:]
    fp, gp = _pad(feature.to(corr.dtype)), _pad(grad_out.to(corr.dtype))
    g = _view(gp, 0, 0, H, W)
    attn = _attention(corr)
    grad_attn = torch.empty_like(corr)
    product = torch.empty_like(g)
    for n, (dy, dx) in enumerate(NEIGHBOURS):
        grad_attn[:, n] = torch.mul(g, _view(fp, dy, dx, H, W), out=product).sum(1)
    del product
    # softmax backward, then clamp(min=0) backward (zero where corr <= 0, as torch.clamp and relu)
    grad_corr = attn * (grad_attn - (attn * grad_attn).sum(1, keepdim=True))
    grad_corr = grad_corr * (corr > 0)
    both = grad_corr + _from_other_end(grad_corr)  # dcorr_n[p] + dcorr_{24-n}[p + d_n]
    ap = _pad(attn)
    grad = torch.zeros_like(feature, dtype=fp.dtype)
    for n, (dy, dx) in enumerate(NEIGHBOURS):
        grad.addcmul_(_view(fp, dy, dx, H, W), both[:, n:n + 1])                 # dot products
        grad.addcmul_(_view(gp, -dy, -dx, H, W), _view(ap[:, n:n + 1], -dy, -dx, H, W))  # value path
    return grad.to(feature.dtype)


class _FeaturePropagation(torch.autograd.Function):
    """Saves F (input dtype) and corr (B, 25, H, W, float32); recomputes the rest."""

    @staticmethod
    def forward(ctx, feature: torch.Tensor) -> torch.Tensor:
        with torch.autocast(feature.device.type, enabled=False):
            out, corr = propagation_forward(feature)
        ctx.save_for_backward(feature, corr)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor) -> torch.Tensor:
        feature, corr = ctx.saved_tensors
        with torch.autocast(feature.device.type, enabled=False):
            return propagation_backward(feature, corr, grad_out)


def feature_propagation(feature: torch.Tensor) -> torch.Tensor:
    """Propagate features over a dilated 5x5 neighbourhood.

    Args:
        feature: (B, C, H, W) feature map, any float dtype, any device.
    Returns:
        (B, C, H, W): sum_n softmax_n(relu(<F, F_n>)) * F_n, zero padding outside the image,
        same dtype as the input.
    """
    if feature.dim() != 4:
        raise ValueError(f"feature_propagation expects a (B, C, H, W) tensor, got shape {tuple(feature.shape)}")
    if not feature.is_floating_point():
        raise TypeError(f"feature_propagation expects a float tensor, got {feature.dtype}")
    return _FeaturePropagation.apply(feature)


def propagation_function(choice: "str | Propagation") -> Propagation:
    """The propagation implementation a name selects; a callable is returned as it is (benchmarks and
    experiments pass their own, e.g. the paper's unfold formulation).

    Args:
        choice: "torch" (feature_propagation), "triton" (feature_propagation_triton) or a callable
            (B, C, H, W) -> (B, C, H, W).
    Raises:
        UserError: an unknown name, or "triton" where triton is not installed or there is no CUDA
            device (Triton's interpreter, TRITON_INTERPRET=1, counts as one: it is how tests run the kernels).
    """
    if callable(choice):
        return choice
    if choice == "torch":
        return feature_propagation
    if choice != "triton":
        raise UserError(f"--propagation {choice!r}: expected one of {', '.join(PROPAGATIONS)}")
    if importlib.util.find_spec("triton") is None:
        raise UserError("--propagation triton: the triton package is not installed; use --propagation torch")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        raise UserError("--propagation triton: the Triton kernels need a CUDA device and none is available; "
                        "use --propagation torch")
    from models.feature_propagation_triton import feature_propagation_triton  # only now: it imports triton
    return feature_propagation_triton
