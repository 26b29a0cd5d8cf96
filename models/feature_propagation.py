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

`feature_propagation_triton` computes the same thing with three fused Triton kernels (CUDA; tested
on CPU through Triton's interpreter, TRITON_INTERPRET=1). It is opt-in until a GPU benchmark has
measured it: set TRITON_ON_CUDA = True to make `feature_propagation` use it for CUDA tensors.
"""
import os

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the pure-torch path needs nothing else
    triton = None

TRITON_ON_CUDA = False  # route CUDA float16/bfloat16/float32 inputs to the Triton kernels

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
    B, C, H, W = feature.shape
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
    B, C, H, W = feature.shape
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


# ---------------------------------------------------------------------------------------------
# Triton path. One program = one image b and BLOCK_P flattened pixels; channels go in chunks of
# BLOCK_C, so any C works. Neighbour n has offset (dy, dx) = (2 * (n // 5) - 4, 2 * (n % 5) - 4).
# All arithmetic in float32; corr / attn / dcorr are contiguous (B, 25, H, W) float32 buffers.

BLOCK_P, BLOCK_C = 64, 32

if triton is not None:

    @triton.jit
    def _load_tile(ptr, c, c_mask, h, w, valid, sc, sh, sw):
        """(BLOCK_C, BLOCK_P) float32 tile X[c, h, w], zero where masked (outside the image)."""
        offs = c[:, None] * sc + (h * sh + w * sw)[None, :]
        return tl.load(ptr + offs, mask=c_mask[:, None] & valid[None, :], other=0.0).to(tl.float32)

    @triton.jit
    def _inside(h, w, H, W, in_range):
        return in_range & (h >= 0) & (h < H) & (w >= 0) & (w < W)

    @triton.jit
    def _online_softmax(m, l, r):
        """One step of a running softmax: max m and normaliser l after seeing the logits r."""
        m_new = tl.maximum(m, r)
        return m_new, l * tl.exp(m - m_new) + tl.exp(r - m_new)

    @triton.jit
    def _fwd_kernel(f_ptr, out_ptr, corr_ptr, C, H, W, sfb, sfc, sfh, sfw, sob, soc, soh, sow,
                    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
        b = tl.program_id(1).to(tl.int64)
        p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
        HW = H * W
        in_range = p < HW
        h, w = p // W, p % W
        cs = tl.arange(0, BLOCK_C)
        f = f_ptr + b * sfb
        corr_row = corr_ptr + b * 25 * HW + p
        # pass 1: the 25 correlations (stored) and an online softmax max / normaliser
        m = tl.zeros([BLOCK_P], tl.float32)  # relu(corr) >= 0, so 0 is a valid start
        l = tl.zeros([BLOCK_P], tl.float32)
        for n in tl.static_range(25):
            nh, nw = h + (2 * (n // 5) - 4), w + (2 * (n % 5) - 4)
            valid = _inside(nh, nw, H, W, in_range)
            corr = tl.zeros([BLOCK_P], tl.float32)
            for c0 in range(0, C, BLOCK_C):
                c = c0 + cs
                centre = _load_tile(f, c, c < C, h, w, in_range, sfc, sfh, sfw)
                corr += tl.sum(centre * _load_tile(f, c, c < C, nh, nw, valid, sfc, sfh, sfw), axis=0)
            tl.store(corr_row + n * HW, corr, mask=in_range)
            m, l = _online_softmax(m, l, tl.maximum(corr, 0.0))
        tl.debug_barrier()  # corr was stored in the reduction's thread layout; reread in another
        # pass 2: out = sum_n A_n * F_n, chunk by chunk
        for c0 in range(0, C, BLOCK_C):
            c = c0 + cs
            acc = tl.zeros([BLOCK_C, BLOCK_P], tl.float32)
            for n in tl.static_range(25):
                nh, nw = h + (2 * (n // 5) - 4), w + (2 * (n % 5) - 4)
                valid = _inside(nh, nw, H, W, in_range)
                attn = tl.exp(tl.maximum(tl.load(corr_row + n * HW, mask=in_range, other=0.0), 0.0) - m) / l
                acc += attn[None, :] * _load_tile(f, c, c < C, nh, nw, valid, sfc, sfh, sfw)
            offs = c[:, None] * soc + (h * soh + w * sow)[None, :]
            tl.store(out_ptr + b * sob + offs, acc.to(out_ptr.dtype.element_ty),
                     mask=(c < C)[:, None] & in_range[None, :])

    @triton.jit
    def _bwd_attn_kernel(f_ptr, g_ptr, corr_ptr, dattn_ptr, attn_ptr, dcorr_ptr, C, H, W,
                         sfb, sfc, sfh, sfw, sgb, sgc, sgh, sgw,
                         BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
        """attn = softmax(relu(corr)) and dcorr = attn * (dA - sum_n attn dA) * (corr > 0),
        with dA_n = <G[p], F[p + d_n]> parked in dattn. Each buffer is written in one pass only and
        read after a barrier: small tensors are replicated across threads, so rewriting a buffer
        that other threads still read would race."""
        b = tl.program_id(1).to(tl.int64)
        p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
        HW = H * W
        in_range = p < HW
        h, w = p // W, p % W
        cs = tl.arange(0, BLOCK_C)
        f, g = f_ptr + b * sfb, g_ptr + b * sgb
        row = b * 25 * HW + p
        corr_row, dattn_row, attn_row, dcorr_row = corr_ptr + row, dattn_ptr + row, attn_ptr + row, dcorr_ptr + row
        m = tl.zeros([BLOCK_P], tl.float32)
        l = tl.zeros([BLOCK_P], tl.float32)
        for n in tl.static_range(25):  # dA_n and the softmax statistics
            nh, nw = h + (2 * (n // 5) - 4), w + (2 * (n % 5) - 4)
            valid = _inside(nh, nw, H, W, in_range)
            d_attn = tl.zeros([BLOCK_P], tl.float32)
            for c0 in range(0, C, BLOCK_C):
                c = c0 + cs
                g_c = _load_tile(g, c, c < C, h, w, in_range, sgc, sgh, sgw)
                d_attn += tl.sum(g_c * _load_tile(f, c, c < C, nh, nw, valid, sfc, sfh, sfw), axis=0)
            tl.store(dattn_row + n * HW, d_attn, mask=in_range)
            m, l = _online_softmax(m, l, tl.maximum(tl.load(corr_row + n * HW, mask=in_range, other=0.0), 0.0))
        tl.debug_barrier()
        s = tl.zeros([BLOCK_P], tl.float32)  # sum_n attn_n dA_n
        for n in tl.static_range(25):
            corr = tl.load(corr_row + n * HW, mask=in_range, other=0.0)
            s += tl.exp(tl.maximum(corr, 0.0) - m) / l * tl.load(dattn_row + n * HW, mask=in_range, other=0.0)
        for n in tl.static_range(25):
            corr = tl.load(corr_row + n * HW, mask=in_range, other=0.0)
            attn = tl.exp(tl.maximum(corr, 0.0) - m) / l
            d_attn = tl.load(dattn_row + n * HW, mask=in_range, other=0.0)
            tl.store(attn_row + n * HW, attn, mask=in_range)
            tl.store(dcorr_row + n * HW, tl.where(corr > 0, attn * (d_attn - s), 0.0), mask=in_range)

    @triton.jit
    def _bwd_feature_kernel(f_ptr, g_ptr, attn_ptr, dcorr_ptr, grad_ptr, C, H, W,
                            sfb, sfc, sfh, sfw, sgb, sgc, sgh, sgw, sdb, sdc, sdh, sdw,
                            BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
        """dF[q] = sum_n dcorr_n[q] F[q + d_n] + attn_n[q - d_n] G[q - d_n] + dcorr_n[q - d_n] F[q - d_n]."""
        b = tl.program_id(1).to(tl.int64)
        p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
        c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_mask = c < C
        HW = H * W
        in_range = p < HW
        h, w = p // W, p % W
        f, g = f_ptr + b * sfb, g_ptr + b * sgb
        attn_img, dcorr_img = attn_ptr + b * 25 * HW, dcorr_ptr + b * 25 * HW
        acc = tl.zeros([BLOCK_C, BLOCK_P], tl.float32)
        for n in tl.static_range(25):
            dy, dx = 2 * (n // 5) - 4, 2 * (n % 5) - 4
            nh, nw = h + dy, w + dx  # F[q]'s own side of corr_n[q]
            dcorr = tl.load(dcorr_img + n * HW + p, mask=in_range, other=0.0)
            acc += dcorr[None, :] * _load_tile(f, c, c_mask, nh, nw, _inside(nh, nw, H, W, in_range), sfc, sfh, sfw)
            sh, sw = h - dy, w - dx  # q is neighbour n of src = q - d_n
            src_ok = _inside(sh, sw, H, W, in_range)
            src = sh * W + sw
            attn_s = tl.load(attn_img + n * HW + src, mask=src_ok, other=0.0)
            dcorr_s = tl.load(dcorr_img + n * HW + src, mask=src_ok, other=0.0)
            acc += attn_s[None, :] * _load_tile(g, c, c_mask, sh, sw, src_ok, sgc, sgh, sgw)
            acc += dcorr_s[None, :] * _load_tile(f, c, c_mask, sh, sw, src_ok, sfc, sfh, sfw)
        offs = c[:, None] * sdc + (h * sdh + w * sdw)[None, :]
        tl.store(grad_ptr + b * sdb + offs, acc.to(grad_ptr.dtype.element_ty),
                 mask=c_mask[:, None] & in_range[None, :])


class _FeaturePropagationTriton(torch.autograd.Function):
    """Same contract as _FeaturePropagation (saves F and float32 corr), fused Triton kernels."""

    @staticmethod
    def forward(ctx, feature: torch.Tensor) -> torch.Tensor:
        B, C, H, W = feature.shape
        out = torch.empty_like(feature)
        corr = torch.empty(B, 25, H, W, dtype=torch.float32, device=feature.device)
        grid = (triton.cdiv(H * W, BLOCK_P), B)
        _fwd_kernel[grid](feature, out, corr, C, H, W, *feature.stride(), *out.stride(),
                          BLOCK_C=BLOCK_C, BLOCK_P=BLOCK_P)
        ctx.save_for_backward(feature, corr)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor) -> torch.Tensor:
        feature, corr = ctx.saved_tensors
        B, C, H, W = feature.shape
        d_attn, attn, dcorr = torch.empty_like(corr), torch.empty_like(corr), torch.empty_like(corr)
        grad = torch.empty_like(feature)
        grid = (triton.cdiv(H * W, BLOCK_P), B)
        _bwd_attn_kernel[grid](feature, grad_out, corr, d_attn, attn, dcorr, C, H, W, *feature.stride(),
                               *grad_out.stride(), BLOCK_C=BLOCK_C, BLOCK_P=BLOCK_P)
        grid = (triton.cdiv(H * W, BLOCK_P), B, triton.cdiv(C, BLOCK_C))
        _bwd_feature_kernel[grid](feature, grad_out, attn, dcorr, grad, C, H, W, *feature.stride(),
                                  *grad_out.stride(), *grad.stride(), BLOCK_C=BLOCK_C, BLOCK_P=BLOCK_P)
        return grad


def feature_propagation_triton(feature: torch.Tensor) -> torch.Tensor:
    """feature_propagation through the Triton kernels (float16/bfloat16/float32, CUDA; CPU tensors
    only under Triton's interpreter, TRITON_INTERPRET=1, which is for tests).

    Args:
        feature: (B, C, H, W) feature map.
    Returns:
        (B, C, H, W) propagated features, same dtype as the input.
    """
    if triton is None:
        raise RuntimeError("feature_propagation_triton: triton is not installed")
    if feature.dim() != 4 or feature.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"feature_propagation_triton expects a (B, C, H, W) float16/bfloat16/float32 "
                         f"tensor, got shape {tuple(feature.shape)} {feature.dtype}")
    if not feature.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(f"feature_propagation_triton: needs a CUDA tensor (got {feature.device}); "
                           f"CPU tensors run only under TRITON_INTERPRET=1")
    return _FeaturePropagationTriton.apply(feature)


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
    if TRITON_ON_CUDA and feature.is_cuda and feature.dtype != torch.float64 and triton is not None:
        return _FeaturePropagationTriton.apply(feature)
    return _FeaturePropagation.apply(feature)

