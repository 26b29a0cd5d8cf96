"""Feature propagation: each pixel's feature becomes an affinity-weighted mean of its
25 neighbours in a 5x5 window at dilation 2 (the paper's `prop` consistency).

    corr_n[p] = <F[p], F[p + d_n]>             (0 where p + d_n is outside the image)
    A[p]      = softmax_n(max(corr_n[p], 0))   (outside neighbours still get weight e^0)
    out[p]    = sum_n A_n[p] * F[p + d_n]

The paper's code builds this with unfold(kernel_size=5, dilation=2, padding=4) + einsum,
which materialises a (B, C*25, H*W) tensor and keeps it for the backward pass. Here a custom
autograd Function loops over the 25 shifted views of one zero-padded copy of F and saves only
F and the (B, 25, H, W) correlations; the backward pass recomputes the shifted products.

Precision: the correlations, the softmax and all sums are computed in float32 (float64 for
float64 inputs), whatever the input dtype or autocast state; the output and the gradient come
back in the input dtype. So bf16/fp16 features (autocast) work and stay cheap to save.
"""
import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

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
    return torch.softmax(corr.clamp(min=0), dim=1)


def propagation_forward(feature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward math, no autograd.

    Args:
        feature: (B, C, H, W), any float dtype.
    Returns:
        out (B, C, H, W) in feature's dtype, corr (B, 25, H, W) in the accumulation dtype.
    """
    B, C, H, W = feature.shape
    f = feature.to(_acc_dtype(feature.dtype))
    fp = _pad(f)
    shifted = [_view(fp, dy, dx, H, W) for dy, dx in NEIGHBOURS]
    corr = torch.stack([(f * s).sum(1) for s in shifted], dim=1)
    attn = _attention(corr)
    out = torch.zeros_like(f)
    for n, s in enumerate(shifted):
        out.addcmul_(s, attn[:, n:n + 1])
    return out.to(feature.dtype), corr


def propagation_backward(feature: torch.Tensor, corr: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """Backward math: dL/dF given dL/dout, recomputing the shifted products.

    Each neighbour pair (p, q = p + d_n) appears three times: F[p] receives dcorr_n[p] * F[q]
    (its side of the dot product), F[q] receives A_n[p] * G[p] (value path) and
    dcorr_n[p] * F[p] (its side of the dot product). The last two are gathered at q from
    p = q - d_n through zero-padded A, dcorr, G and F: outside the image they are zero,
    which drops the pairs whose p lies in the padding.

    Args:
        feature: (B, C, H, W) saved input, any float dtype.
        corr: (B, 25, H, W) saved correlations (before the clamp), accumulation dtype.
        grad_out: (B, C, H, W) gradient of the output.
    Returns:
        (B, C, H, W) gradient of the input, in feature's dtype.
    """
    B, C, H, W = feature.shape
    f, g = feature.to(corr.dtype), grad_out.to(corr.dtype)
    fp, gp = _pad(f), _pad(g)
    attn = _attention(corr)
    grad_attn = torch.stack([(g * _view(fp, dy, dx, H, W)).sum(1) for dy, dx in NEIGHBOURS], dim=1)
    # softmax backward, then clamp(min=0) backward (passes where corr >= 0, like torch.clamp)
    grad_corr = attn * (grad_attn - (attn * grad_attn).sum(1, keepdim=True))
    grad_corr = grad_corr * (corr >= 0)
    ap, cp = _pad(attn), _pad(grad_corr)
    grad = torch.zeros_like(f)
    for n, (dy, dx) in enumerate(NEIGHBOURS):
        grad.addcmul_(_view(fp, dy, dx, H, W), grad_corr[:, n:n + 1])          # F[p]'s own side
        a_src = _view(ap[:, n:n + 1], -dy, -dx, H, W)                          # A_n[q - d_n]
        c_src = _view(cp[:, n:n + 1], -dy, -dx, H, W)                          # dcorr_n[q - d_n]
        grad.addcmul_(_view(gp, -dy, -dx, H, W), a_src)                        # value path
        grad.addcmul_(_view(fp, -dy, -dx, H, W), c_src)                        # F[q]'s side
    return grad.to(feature.dtype)


_COMPILED: dict[str, object] = {}


def _math(name: str, compiled: bool):
    fn = {"forward": propagation_forward, "backward": propagation_backward}[name]
    if not compiled:
        return fn
    if name not in _COMPILED:  # compiled lazily: importing this module must stay cheap
        _COMPILED[name] = torch.compile(fn, dynamic=False)
    return _COMPILED[name]


class _FeaturePropagation(torch.autograd.Function):
    """Saves F (input dtype) and corr (B, 25, H, W, float32); recomputes the rest."""

    @staticmethod
    def forward(ctx, feature: torch.Tensor, compiled: bool) -> torch.Tensor:
        with torch.autocast(feature.device.type, enabled=False):
            out, corr = _math("forward", compiled)(feature)
        ctx.save_for_backward(feature, corr)
        ctx.compiled = compiled
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor, None]:
        feature, corr = ctx.saved_tensors
        with torch.autocast(feature.device.type, enabled=False):
            grad = _math("backward", ctx.compiled)(feature, corr, grad_out)
        return grad, None


def feature_propagation(feature: torch.Tensor, compiled: bool = False) -> torch.Tensor:
    """Propagate features over a dilated 5x5 neighbourhood.

    Args:
        feature: (B, C, H, W) feature map, any float dtype, any device.
        compiled: run the forward/backward math through torch.compile (fuses the 25-neighbour
            loops into a few kernels; compiles once per shape). Off by default.
    Returns:
        (B, C, H, W): sum_n softmax_n(relu(<F, F_n>)) * F_n, zero padding outside the image,
        same dtype as the input.
    """
    if feature.dim() != 4:
        raise ValueError(f"feature_propagation expects a (B, C, H, W) tensor, got shape {tuple(feature.shape)}")
    if not feature.is_floating_point():
        raise TypeError(f"feature_propagation expects a float tensor, got {feature.dtype}")
    return _FeaturePropagation.apply(feature, compiled)
