"""feature_propagation against the paper's unfold + einsum formulation (written here, independently):
values, input gradients (also torch.autograd.gradcheck), dtypes, layouts, and saved memory; the Triton
kernels against the same formulation (on CUDA, or on CPU through Triton's interpreter); selecting an
implementation by name. Each test skips only for what it needs: CUDA, or triton."""
import importlib
import importlib.util
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from common.errors import UserError
from models.feature_propagation import feature_propagation, propagation_function
from models.memory import CpuPeakBytes, saved_tensor_bytes
from models.segmentation_net import build_model

fp = importlib.import_module("models.feature_propagation")  # the package re-exports a function of that name

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
TRITON_DEVICE = "cpu" if INTERPRET else "cuda"
HAS_TRITON = importlib.util.find_spec("triton") is not None
# the Triton kernels run here directly: on CUDA, or on CPU when this process was started under the interpreter
needs_triton_kernels = pytest.mark.skipif(
    not HAS_TRITON or not (INTERPRET or torch.cuda.is_available()),
    reason="needs triton and CUDA, or TRITON_INTERPRET=1 (test_triton_under_interpreter sets it)")


def _triton_fn():
    """The Triton entry point, imported only by tests that run it (the module imports triton)."""
    from models.feature_propagation_triton import feature_propagation_triton
    return feature_propagation_triton

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
@pytest.mark.slow
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


def test_saved_memory_at_most_a_fifth_of_unfold():
    B, C, H, W = 2, 32, 24, 20
    feature = torch.randn(B, C, H, W, requires_grad=True)
    ours = saved_tensor_bytes(feature_propagation, feature)
    ref = saved_tensor_bytes(unfold_propagation, feature)
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
    if impl == "triton" and not HAS_TRITON:
        pytest.skip("triton not installed")
    fn = feature_propagation if impl == "torch" else _triton_fn()
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


@needs_triton_kernels
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
    out, grad = _value_and_grad(_triton_fn(), x, grad_out.to(TRITON_DEVICE))
    assert out.dtype == dtype and grad.dtype == dtype
    eps = 1e-5 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
    for got, ref in ((out, ref_out), (grad, ref_grad)):
        torch.testing.assert_close(got.cpu().double(), ref, rtol=2 * eps, atol=2 * eps * ref.abs().amax().item())


@needs_triton_kernels
def test_triton_partial_use_of_output():
    """A crop of the output reaches the loss: the output gradient arrives strided / with zeros."""
    feature = torch.randn(2, 5, 7, 6, generator=torch.Generator().manual_seed(7))
    grads = []
    for fn, x in ((_triton_fn(), feature.to(TRITON_DEVICE)), (unfold_propagation, feature.double())):
        x.requires_grad_()
        fn(x)[:, 1, 2:5, 1:3].sum().backward()
        grads.append(x.grad.cpu().double())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-5 * grads[1].abs().amax().item())


@pytest.mark.skipif(not HAS_TRITON or not torch.cuda.is_available(), reason="needs triton and CUDA (too slow for "
                    "the interpreter; test_build_model_selects_triton checks the routing without CUDA)")
def test_triton_model_matches_torch_model_on_cuda():
    """build_model(propagation="triton") on the GPU: the same propagated features, logits and weight
    gradients as the default ("torch") model with the same weights."""
    x = torch.randn(2, 3, 32, 40, generator=torch.Generator().manual_seed(9)).to(TRITON_DEVICE)
    results = []
    for propagation in ("torch", "triton"):
        torch.manual_seed(0)
        net = build_model("gaze_sup", 2, 3, (4, 4, 8, 8, 16, 4), 4, propagation=propagation).to(TRITON_DEVICE)
        out = net(x)
        (out["logits_prop_1"].square().mean() + out["logits_prop_2"].mean()).backward()
        results.append((out["feature_prop_1"].detach(), out["logits_prop_2"].detach(),
                        net.model[0].encoder.conv_0.conv_0.conv.weight.grad))
    assert type(out["feature_prop_1"].grad_fn).__name__.startswith("_FeaturePropagationTritonBackward")
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not HAS_TRITON or INTERPRET or torch.cuda.is_available(),
                    reason="triton missing, or the Triton tests already run directly (CUDA / interpreter)")
@pytest.mark.slow
def test_triton_under_interpreter():
    """Run the Triton tests above on CPU through Triton's interpreter, in a fresh process (the
    interpreter is chosen when the kernels are defined, at import)."""
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
         "test_triton_matches_unfold or test_triton_partial_use"],
        env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "5 passed" in result.stdout, result.stdout[-2000:]


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton (the checks run before any kernel)")
def test_triton_entry_point_rejects_what_it_cannot_run():
    fn = _triton_fn()
    with pytest.raises(ValueError, match="float64"):
        fn(torch.randn(1, 2, 3, 3, dtype=torch.float64))
    if not INTERPRET:  # a CPU tensor reaches the kernels only under the interpreter
        with pytest.raises(UserError, match=r"--propagation triton.*CUDA tensors.*cpu"):
            fn(torch.randn(1, 2, 3, 3))


def test_propagation_is_selected_by_name():
    assert propagation_function("torch") is feature_propagation
    assert propagation_function(torch.tanh) is torch.tanh  # a callable is used as it is
    with pytest.raises(UserError, match=r"--propagation 'cuda': expected one of torch, triton"):
        propagation_function("cuda")
    if HAS_TRITON and (INTERPRET or torch.cuda.is_available()):
        assert propagation_function("triton") is _triton_fn()


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_build_model_selects_triton(monkeypatch):
    """The model calls the Triton entry point (building needs a CUDA device: one is pretended, nothing runs)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    net = build_model("gaze_sup", 2, 3, (4, 4, 8, 8, 16, 4), 4, propagation="triton")
    assert net.propagate_fn is _triton_fn() and net.propagation == "triton"
    assert "propagation=triton" in repr(net)


def test_triton_without_triton_or_cuda_fails_at_build_time(monkeypatch):
    """Both refusals, whatever this machine has: the package is hidden from the import system, then CUDA."""
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton"
                        else real_find_spec(name, *a))
    with pytest.raises(UserError, match=r"^--propagation triton: the triton package is not installed"):
        build_model("gaze_sup", 2, 3, (4, 4, 8, 8, 16, 4), 4, propagation="triton")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "triton"
                        else real_find_spec(name, *a))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(UserError, match=r"^--propagation triton: the Triton kernels need a CUDA device"):
        build_model("gaze_sup", 2, 3, (4, 4, 8, 8, 16, 4), 4, propagation="triton")
