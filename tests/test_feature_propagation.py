"""feature_propagation against the paper's unfold + einsum formulation (written here, independently):
values, input gradients (also torch.autograd.gradcheck), dtypes, layouts, and saved memory."""
import importlib
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from models.feature_propagation import feature_propagation, feature_propagation_triton
from scripts.benchmark import CpuPeakBytes  # replays the profiler's allocation events

fp = importlib.import_module("models.feature_propagation")  # the package re-exports a function of that name

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
TRITON_DEVICE = "cpu" if INTERPRET else "cuda"

SHAPES = [(1, 1, 1, 1), (2, 3, 1, 1), (2, 4, 3, 5), (1, 5, 8, 8), (3, 6, 9, 13), (2, 3, 13, 4)]


def unfold_propagation(feature: torch.Tensor) -> torch.Tensor:
    """The paper's formulation: materialise the 25 dilated neighbours with unfold."""
    B, C, H, W = feature.shape
    neigh = F.unfold(feature, kernel_size=5, dilation=2, padding=4).view(B, C, 25, H, W)
    corr = torch.einsum("bchw,bcnhw->bnhw", feature, neigh)
    attn = torch.softmax(corr.clamp(min=0), dim=1)
    return torch.einsum("bnhw,bcnhw->bchw", attn, neigh)


def _value_and_grad(fn, feature: torch.Tensor, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = feature.detach().clone().requires_grad_()
    out = fn(x)
    out.backward(grad_out)
    return out.detach(), x.grad


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scale", [0.3, 2.0])
def test_matches_unfold_values_and_grads(shape, scale):
    gen = torch.Generator().manual_seed(sum(shape))
    feature = scale * torch.randn(shape, generator=gen, dtype=torch.float64)
    grad_out = torch.randn(shape, generator=gen, dtype=torch.float64)
    out, grad = _value_and_grad(feature_propagation, feature, grad_out)
    ref_out, ref_grad = _value_and_grad(unfold_propagation, feature, grad_out)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-10)


def test_denormal_attention_weights_are_flushed_without_changing_the_result():
    # centre correlations of ~90 put many float32 softmax weights in the denormal range (< 1.18e-38)
    gen = torch.Generator().manual_seed(3)
    feature = 1.7 * torch.randn(2, 32, 12, 12, generator=gen)
    _, corr = fp.propagation_forward(feature)
    plain = torch.softmax(corr.clamp(min=0), dim=1)
    tiny = torch.finfo(torch.float32).tiny
    assert ((plain > 0) & (plain < tiny)).any()
    attn = fp._attention(corr)
    assert not ((attn > 0) & (attn < tiny)).any()
    assert torch.equal(attn[plain >= tiny], plain[plain >= tiny])
    grad_out = torch.randn(feature.shape, generator=gen)
    out, grad = _value_and_grad(feature_propagation, feature, grad_out)
    ref_out, ref_grad = _value_and_grad(unfold_propagation, feature.double(), grad_out.double())
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", [(1, 2, 1, 1), (2, 2, 3, 5), (1, 2, 8, 8), (1, 1, 6, 10)])
def test_gradcheck(shape):
    feature = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert torch.autograd.gradcheck(feature_propagation, (feature.requires_grad_(),))


def test_zero_feature_pixel_matches_clamp_subgradient():
    """A zero feature vector makes all its correlations exactly 0: the clamp's gradient at 0
    must be the one torch.clamp uses (zero)."""
    feature = torch.randn(2, 4, 7, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    feature[:, :, 3, 4] = 0
    grad_out = torch.randn_like(feature)
    _, grad = _value_and_grad(feature_propagation, feature, grad_out)
    _, ref_grad = _value_and_grad(unfold_propagation, feature, grad_out)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-10)


def test_partial_use_of_output():
    """Only a crop and one channel of the output reach the loss: gradients still match and
    reach pixels outside the crop through their neighbours."""
    feature = torch.randn(2, 5, 12, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    grads = []
    for fn in (feature_propagation, unfold_propagation):
        x = feature.clone().requires_grad_()
        fn(x)[:, 1, 2:5, 3:6].sum().backward()  # the gradient arrives as a strided/expanded tensor
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-10)
    outside = grads[0].clone()
    outside[:, :, 2:5, 3:6] = 0
    assert outside.abs().amax() > 0
    assert grads[0][:, :, 9:].abs().amax() == 0  # beyond 4 pixels of the crop nothing depends on it


def test_channels_last_input():
    feature = torch.randn(2, 6, 9, 11, generator=torch.Generator().manual_seed(3))
    grad_out = torch.randn_like(feature)
    out, grad = _value_and_grad(feature_propagation, feature.to(memory_format=torch.channels_last), grad_out)
    ref_out, ref_grad = _value_and_grad(unfold_propagation, feature, grad_out)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(dtype):
    """Half inputs give half outputs/gradients equal to the float64 computation on the same
    (rounded) input, up to the output rounding: the internal math runs in float32."""
    feature = torch.randn(2, 8, 10, 7, generator=torch.Generator().manual_seed(4)).to(dtype)
    grad_out = torch.randn(feature.shape, generator=torch.Generator().manual_seed(5)).to(dtype)
    out, grad = _value_and_grad(feature_propagation, feature, grad_out)
    assert out.dtype == dtype and grad.dtype == dtype
    ref_out, ref_grad = _value_and_grad(unfold_propagation, feature.double(), grad_out.double())
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(out.double(), ref_out, rtol=2 * eps, atol=2 * eps * ref_out.abs().amax().item())
    torch.testing.assert_close(grad.double(), ref_grad, rtol=4 * eps, atol=4 * eps * ref_grad.abs().amax().item())


def test_under_autocast_bf16():
    """Inside CPU autocast a conv hands over a bf16 feature map; forward and backward run and
    the gradient reaches the conv weights."""
    conv = torch.nn.Conv2d(3, 8, 3, padding=1)
    x = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(6))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feature = conv(x)
        out = feature_propagation(feature)
    assert feature.dtype == torch.bfloat16 and out.dtype == torch.bfloat16
    out.float().square().mean().backward()
    assert conv.weight.grad is not None and torch.isfinite(conv.weight.grad).all()
    ref = unfold_propagation(feature.detach().double())
    torch.testing.assert_close(out.detach().double(), ref, rtol=1e-2, atol=1e-2 * ref.abs().amax().item())


def _saved_bytes(fn, feature: torch.Tensor) -> int:
    """Exact bytes autograd keeps for the backward pass (distinct storages), device-independent."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(feature)
    return sum(storages.values())


def test_saved_memory_at_most_a_fifth_of_unfold():
    B, C, H, W = 2, 32, 24, 20
    feature = torch.randn(B, C, H, W, requires_grad=True)
    ours = _saved_bytes(feature_propagation, feature)
    ref = _saved_bytes(unfold_propagation, feature)
    assert ours == B * C * H * W * 4 + B * 25 * H * W * 4  # F itself + the float32 correlations
    assert ref >= B * C * 25 * H * W * 4  # at least the unfolded neighbours
    assert ours <= ref / 5, (ours, ref)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match=r"\(B, C, H, W\).*\(3, 4, 5\)"):
        feature_propagation(torch.randn(3, 4, 5))
    with pytest.raises(TypeError, match="float"):
        feature_propagation(torch.ones(1, 2, 3, 3, dtype=torch.int64))


def _cpu_peak_bytes(fn, feature: torch.Tensor, grad_out: torch.Tensor) -> int:
    """Peak bytes allocated on top of the start during forward + backward (allocator level, exact)."""
    with CpuPeakBytes() as memory:
        fn(feature).backward(grad_out)
    assert memory.peak > 0, "the profiler recorded no allocations"
    return memory.peak


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_peak_memory_at_most_a_fifth_of_unfold(dtype):
    """Peak of forward + backward (transients, the output and the input gradient included) at
    the paper's feature dimension (128)."""
    feature = torch.randn(2, 128, 24, 20, generator=torch.Generator().manual_seed(8)).to(dtype)
    grad_out = torch.randn_like(feature)
    peaks = [_cpu_peak_bytes(fn, feature.clone().requires_grad_(), grad_out)
             for fn in (feature_propagation, unfold_propagation)]
    assert peaks[1] >= 25 * feature.numel() * feature.element_size()  # the unfolded neighbours at least
    assert peaks[0] <= peaks[1] / 5, peaks


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_cuda_values_and_peak_memory(dtype, impl):
    if impl == "triton" and fp.triton is None:
        pytest.skip("triton not installed")
    fn = feature_propagation if impl == "torch" else feature_propagation_triton
    feature = torch.randn(2, 128, 64, 48, device="cuda").to(dtype)
    grad_out = torch.randn_like(feature)
    peaks, results = [], []
    for f in (fn, unfold_propagation):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        results.append(_value_and_grad(f, feature, grad_out))
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - base)
    ref_out, ref_grad = _value_and_grad(unfold_propagation, feature.double(), grad_out.double())
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(results[0][0].double(), ref_out, rtol=tol, atol=tol * ref_out.abs().amax().item())
    torch.testing.assert_close(results[0][1].double(), ref_grad, rtol=tol, atol=tol * ref_grad.abs().amax().item())
    assert peaks[0] <= peaks[1] / 5, peaks


@pytest.mark.skipif(fp.triton is None or not (INTERPRET or torch.cuda.is_available()),
                    reason="needs triton and CUDA, or TRITON_INTERPRET=1 (test_triton_under_interpreter sets it)")
@pytest.mark.parametrize("shape, dtype, channels_last", [
    ((2, 3, 3, 5), torch.float32, False),
    ((1, 1, 1, 1), torch.float32, False),
    ((1, 37, 6, 5), torch.float32, True),   # two channel chunks, the second partial
    ((1, 4, 9, 7), torch.bfloat16, False),
])
def test_triton_matches_unfold(shape, dtype, channels_last):
    gen = torch.Generator().manual_seed(sum(shape))
    feature = torch.randn(shape, generator=gen).to(dtype)
    grad_out = torch.randn(shape, generator=gen).to(dtype)
    ref_out, ref_grad = _value_and_grad(unfold_propagation, feature.double(), grad_out.double())
    x = feature.to(TRITON_DEVICE)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    out, grad = _value_and_grad(feature_propagation_triton, x, grad_out.to(TRITON_DEVICE))
    assert out.dtype == dtype and grad.dtype == dtype
    eps = 1e-5 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
    for got, ref in ((out, ref_out), (grad, ref_grad)):
        torch.testing.assert_close(got.cpu().double(), ref, rtol=2 * eps, atol=2 * eps * ref.abs().amax().item())


@pytest.mark.skipif(fp.triton is None or not (INTERPRET or torch.cuda.is_available()),
                    reason="needs triton and CUDA, or TRITON_INTERPRET=1 (test_triton_under_interpreter sets it)")
def test_triton_partial_use_of_output():
    """A crop of the output reaches the loss: the output gradient arrives strided / with zeros."""
    feature = torch.randn(2, 5, 7, 6, generator=torch.Generator().manual_seed(7))
    grads = []
    for fn, x in ((feature_propagation_triton, feature.to(TRITON_DEVICE)), (unfold_propagation, feature.double())):
        x.requires_grad_()
        fn(x)[:, 1, 2:5, 1:3].sum().backward()
        grads.append(x.grad.cpu().double())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-5 * grads[1].abs().amax().item())


@pytest.mark.skipif(fp.triton is None or INTERPRET or torch.cuda.is_available(),
                    reason="triton missing, or the Triton tests already run directly (CUDA / interpreter)")
def test_triton_under_interpreter():
    """Run the Triton tests above on CPU through Triton's interpreter, in a fresh process (the
    interpreter is chosen when the kernels are defined, at import)."""
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
         "test_triton_matches_unfold or test_triton_partial_use"],
        env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "5 passed" in result.stdout, result.stdout[-2000:]


def test_triton_entry_point_rejects_what_it_cannot_run():
    if fp.triton is None:
        with pytest.raises(RuntimeError, match="not installed"):
            feature_propagation_triton(torch.randn(1, 2, 3, 3))
        return
    with pytest.raises(ValueError, match="float64"):
        feature_propagation_triton(torch.randn(1, 2, 3, 3, dtype=torch.float64))
    if not INTERPRET:
        with pytest.raises(RuntimeError, match="CUDA"):
            feature_propagation_triton(torch.randn(1, 2, 3, 3))


@pytest.mark.skipif(fp.triton is None or not torch.cuda.is_available(), reason="needs triton and a CUDA device")
def test_triton_on_cuda_flag_routes_and_matches(monkeypatch):
    feature = torch.randn(2, 128, 40, 36, device="cuda")
    grad_out = torch.randn_like(feature)
    torch_out, torch_grad = _value_and_grad(feature_propagation, feature, grad_out)
    monkeypatch.setattr(fp, "TRITON_ON_CUDA", True)
    x = feature.clone().requires_grad_()
    out = feature_propagation(x)
    assert type(out.grad_fn).__name__.startswith("_FeaturePropagationTritonBackward")
    out.backward(grad_out)
    torch.testing.assert_close(out, torch_out, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x.grad, torch_grad, rtol=1e-4, atol=1e-4)
