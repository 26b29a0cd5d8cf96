"""Feature propagation (see models/feature_propagation.py for the math) as three fused Triton kernels:
forward, softmax backward, feature backward. Same contract as the torch path: saves F and the float32
(B, 25, H, W) correlations, returns the input dtype; float16/bfloat16/float32 CUDA tensors (CPU tensors
only under Triton's interpreter, TRITON_INTERPRET=1, which is for tests).

Selected with `build_model(..., propagation="triton")` (`--propagation triton`); this module imports
triton at import time and is imported only then, so CPU-only installs never need it.
"""
import os

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from common.errors import UserError

# One program = one image b and BLOCK_P flattened pixels; channels go in chunks of
# BLOCK_C, so any C works. Neighbour n has offset (dy, dx) = (2 * (n // 5) - 4, 2 * (n % 5) - 4).
# All arithmetic in float32; corr / attn / dcorr are contiguous (B, 25, H, W) float32 buffers.

BLOCK_P, BLOCK_C = 64, 32


@triton.jit
def _load_tile(ptr, c, c_mask, h, w, valid, sc, sh, sw):
    """(BLOCK_C, BLOCK_P) float32 tile X[c, h, w], zero where masked (outside the image)."""
    offs = c[:, None] * sc + (h * sh + w * sw)[None, :]
    return tl.load(ptr + offs, mask=c_mask[:, None] & valid[None, :], other=0.0).to(tl.float32)


@triton.jit
def _inside(h, w, H, W, in_range):
    return in_range & (h >= 0) & (h < H) & (w >= 0) & (w < W)


@triton.jit
def _online_softmax(m, norm, r):
    """One step of a running softmax: max m and normaliser norm after seeing the logits r."""
    m_new = tl.maximum(m, r)
    return m_new, norm * tl.exp(m - m_new) + tl.exp(r - m_new)


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
    norm = tl.zeros([BLOCK_P], tl.float32)
    for n in tl.static_range(25):
        nh, nw = h + (2 * (n // 5) - 4), w + (2 * (n % 5) - 4)
        valid = _inside(nh, nw, H, W, in_range)
        corr = tl.zeros([BLOCK_P], tl.float32)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + cs
            centre = _load_tile(f, c, c < C, h, w, in_range, sfc, sfh, sfw)
            corr += tl.sum(centre * _load_tile(f, c, c < C, nh, nw, valid, sfc, sfh, sfw), axis=0)
        tl.store(corr_row + n * HW, corr, mask=in_range)
        m, norm = _online_softmax(m, norm, tl.maximum(corr, 0.0))
    tl.debug_barrier()  # corr was stored in the reduction's thread layout; reread in another
    # pass 2: out = sum_n A_n * F_n, chunk by chunk
    for c0 in range(0, C, BLOCK_C):
        c = c0 + cs
        acc = tl.zeros([BLOCK_C, BLOCK_P], tl.float32)
        for n in tl.static_range(25):
            nh, nw = h + (2 * (n // 5) - 4), w + (2 * (n % 5) - 4)
            valid = _inside(nh, nw, H, W, in_range)
            attn = tl.exp(tl.maximum(tl.load(corr_row + n * HW, mask=in_range, other=0.0), 0.0) - m) / norm
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
    norm = tl.zeros([BLOCK_P], tl.float32)
    for n in tl.static_range(25):  # dA_n and the softmax statistics
        nh, nw = h + (2 * (n // 5) - 4), w + (2 * (n % 5) - 4)
        valid = _inside(nh, nw, H, W, in_range)
        d_attn = tl.zeros([BLOCK_P], tl.float32)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + cs
            g_c = _load_tile(g, c, c < C, h, w, in_range, sgc, sgh, sgw)
            d_attn += tl.sum(g_c * _load_tile(f, c, c < C, nh, nw, valid, sfc, sfh, sfw), axis=0)
        tl.store(dattn_row + n * HW, d_attn, mask=in_range)
        m, norm = _online_softmax(m, norm, tl.maximum(tl.load(corr_row + n * HW, mask=in_range, other=0.0), 0.0))
    tl.debug_barrier()
    s = tl.zeros([BLOCK_P], tl.float32)  # sum_n attn_n dA_n
    for n in tl.static_range(25):
        corr = tl.load(corr_row + n * HW, mask=in_range, other=0.0)
        s += tl.exp(tl.maximum(corr, 0.0) - m) / norm * tl.load(dattn_row + n * HW, mask=in_range, other=0.0)
    for n in tl.static_range(25):
        corr = tl.load(corr_row + n * HW, mask=in_range, other=0.0)
        attn = tl.exp(tl.maximum(corr, 0.0) - m) / norm
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
    if feature.dim() != 4 or feature.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"feature_propagation_triton expects a (B, C, H, W) float16/bfloat16/float32 "
                         f"tensor, got shape {tuple(feature.shape)} {feature.dtype}")
    if not feature.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        # reached through the CLI as --propagation triton with a CPU device
        raise UserError(f"--propagation triton: the Triton kernels need CUDA tensors, got a tensor on "
                        f"{feature.device}; use --propagation torch")
    return _FeaturePropagationTriton.apply(feature)
