"""Losses against direct computations of the spec's formulas (explicit loops, float64)."""
import math

import pytest
import torch

from losses import bce_loss, consistency_losses, full_sup_loss, gaze_sup_loss, partial_bce_loss


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def bce_direct(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Per-image (masked) mean of -[t log s + (1-t) log(1-s)], then mean over non-empty images."""
    per_image = []
    for b in range(logits.shape[0]):
        x, t = logits[b].double().flatten().tolist(), target[b].double().flatten().tolist()
        m = [1.0] * len(x) if mask is None else mask[b].double().flatten().tolist()
        terms = [-(ti * math.log(sigmoid(xi)) + (1 - ti) * math.log(1 - sigmoid(xi))) * mi
                 for xi, ti, mi in zip(x, t, m)]
        if sum(m) > 0:
            per_image.append(sum(terms) / sum(m))
    return sum(per_image) / len(per_image) if per_image else 0.0


def random_outputs(num_levels: int, shape=(2, 1, 6, 5), prop_shape=None, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(1, num_levels + 1):
        out[f"logits_{i}"] = (2 * torch.randn(shape, generator=g, dtype=torch.float64)).requires_grad_()
        out[f"logits_prop_{i}"] = (2 * torch.randn(prop_shape or shape, generator=g,
                                                   dtype=torch.float64)).requires_grad_()
    return out


def consistency_direct(outputs: dict, num_levels: int, mode: str) -> list[float]:
    """L_i = -(1/(N-1)) sum_{j!=i} mean_{b,h,w} [(1-q_i)(1-p_j) + q_i p_j], element by element.
    For "prop", q_i reads logits_prop_i at the nearest source pixel floor(h * H_in / H_out)."""
    B, _, H, W = outputs["logits_1"].shape
    losses = []
    for i in range(1, num_levels + 1):
        q_src = outputs[f"logits_prop_{i}" if mode == "prop" else f"logits_{i}"].detach()
        Hs, Ws = q_src.shape[-2:]
        total = 0.0
        for j in range(1, num_levels + 1):
            if j == i:
                continue
            p_src = outputs[f"logits_{j}"].detach()
            acc = 0.0
            for b in range(B):
                for h in range(H):
                    for w in range(W):
                        q = sigmoid(q_src[b, 0, h * Hs // H, w * Ws // W].item())
                        p = sigmoid(p_src[b, 0, h, w].item())
                        acc += (1 - q) * (1 - p) + q * p
            total += acc / (B * H * W)
        losses.append(-total / (num_levels - 1))
    return losses


def test_bce_matches_formula():
    torch.manual_seed(0)
    logits = 3 * torch.randn(3, 1, 7, 5)
    target = (torch.rand(3, 1, 7, 5) > 0.5).float()
    assert bce_loss(logits, target).item() == pytest.approx(bce_direct(logits, target), rel=1e-5)


def test_masked_bce_skips_empty_masks():
    torch.manual_seed(1)
    logits = (3 * torch.randn(3, 1, 6, 6)).requires_grad_()
    target = (torch.rand(3, 1, 6, 6) > 0.5).float()
    mask = (torch.rand(3, 1, 6, 6) > 0.3).float()
    mask[1] = 0  # an image with nothing to supervise
    loss = bce_loss(logits, target, mask)
    assert loss.item() == pytest.approx(bce_direct(logits, target, mask), rel=1e-5)
    loss.backward()
    assert logits.grad[1].abs().sum() == 0 and logits.grad[0].abs().sum() > 0

    empty = bce_loss(logits, target, torch.zeros_like(mask))
    assert empty.item() == 0.0 and empty.requires_grad  # still backward-able in a training step


def test_bce_half_precision_logits_computed_in_float32():
    torch.manual_seed(2)
    logits = (3 * torch.randn(2, 1, 8, 8)).bfloat16()
    target = (torch.rand(2, 1, 8, 8) > 0.5).float()
    loss = bce_loss(logits, target)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(bce_direct(logits.float(), target), rel=1e-5)


def test_shape_mismatch_is_reported():
    with pytest.raises(ValueError, match=r"\(2, 1, 4, 4\).*\(2, 4, 4\)"):
        bce_loss(torch.zeros(2, 1, 4, 4), torch.zeros(2, 4, 4))


@pytest.mark.parametrize("mode", ["prop", "pure"])
@pytest.mark.parametrize("num_levels", [2, 3])
def test_consistency_matches_formula(mode, num_levels):
    outputs = random_outputs(num_levels, seed=num_levels)
    got = consistency_losses(outputs, num_levels, mode)
    want = consistency_direct(outputs, num_levels, mode)
    assert len(got) == num_levels
    for g, w in zip(got, want):
        assert g.item() == pytest.approx(w, rel=1e-6)


def test_prop_consistency_resizes_prop_logits_nearest():
    outputs = random_outputs(2, shape=(1, 1, 8, 6), prop_shape=(1, 1, 4, 3), seed=5)
    got = consistency_losses(outputs, 2, "prop")
    want = consistency_direct(outputs, 2, "prop")
    assert [g.item() for g in got] == pytest.approx(want, rel=1e-6)


def test_pure_consistency_sends_no_gradient_to_peers():
    n = 3
    outputs = random_outputs(n, seed=7)
    for i, loss in enumerate(consistency_losses(outputs, n, "pure"), start=1):
        grads = torch.autograd.grad(loss, [outputs[f"logits_{j}"] for j in range(1, n + 1)],
                                    retain_graph=True, allow_unused=True)
        for j, g in enumerate(grads, start=1):
            if j == i:
                assert g is not None and g.abs().sum() > 0
            else:
                assert g is None or g.abs().sum() == 0, f"L_{i} leaks gradient into logits_{j}"


def test_prop_consistency_gradient_only_to_own_prop_logits():
    n = 3
    outputs = random_outputs(n, seed=8)
    leaves = [outputs[f"logits_{j}"] for j in range(1, n + 1)] + \
             [outputs[f"logits_prop_{j}"] for j in range(1, n + 1)]
    M = outputs["logits_1"].numel()
    for i, loss in enumerate(consistency_losses(outputs, n, "prop"), start=1):
        grads = torch.autograd.grad(loss, leaves, retain_graph=True, allow_unused=True)
        for leaf, g in zip(leaves, grads):
            if leaf is outputs[f"logits_prop_{i}"]:
                # dL_i/dz = -(1/(N-1)) sum_{j!=i} (2 p_j - 1) q (1 - q) / M,  q = sigmoid(z)
                q = torch.sigmoid(leaf.detach())
                s = sum(2 * torch.sigmoid(outputs[f"logits_{j}"].detach()) - 1 for j in range(1, n + 1) if j != i)
                assert torch.allclose(g, -s * q * (1 - q) / (M * (n - 1)), atol=1e-12)
            else:
                assert g is None or g.abs().sum() == 0


def test_consistency_half_precision_cast_up():
    outputs = {k: v.detach().bfloat16() for k, v in random_outputs(2, seed=12).items()}
    got = consistency_losses(outputs, 2, "prop")
    want = consistency_direct({k: v.double() for k, v in outputs.items()}, 2, "prop")
    assert all(g.dtype == torch.float32 for g in got)
    assert [g.item() for g in got] == pytest.approx(want, rel=1e-5)


def test_consistency_rejects_bad_arguments():
    outputs = random_outputs(2)
    with pytest.raises(ValueError, match="num_levels >= 2"):
        consistency_losses(outputs, 1)
    with pytest.raises(ValueError, match="unknown mode 'dense'"):
        consistency_losses(outputs, 2, "dense")


def _masks(n, shape=(2, 1, 6, 5), seed=3):
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(shape, generator=g) > 0.5).float() for _ in range(n)]


@pytest.mark.parametrize("mode", ["prop", "pure"])
def test_gaze_sup_total_and_log(mode):
    n, w = 3, 0.7
    outputs, masks = random_outputs(n, seed=9), _masks(3)
    total, log = gaze_sup_loss(outputs, masks, cons_weight=w, cons_mode=mode)
    seg = [bce_direct(outputs[f"logits_{i}"].detach(), masks[i - 1]) for i in range(1, n + 1)]
    cons = consistency_direct(outputs, n, mode)
    assert total.item() == pytest.approx(sum(seg) + w * sum(cons), rel=1e-6)
    assert set(log) == {"loss_seg_1", "loss_seg_2", "loss_seg_3", "loss_cons", "loss"}
    assert [log[f"loss_seg_{i}"] for i in (1, 2, 3)] == pytest.approx(seg, rel=1e-6)
    assert log["loss_cons"] == pytest.approx(sum(cons) / n, rel=1e-6)
    assert log["loss"] == pytest.approx(total.item())
    total.backward()
    assert outputs["logits_1"].grad is not None


def test_gaze_sup_without_consistency():
    outputs, masks = random_outputs(2, seed=10), _masks(2)
    total, log = gaze_sup_loss(outputs, masks, cons_weight=0.0, cons_mode="prop")
    seg = [bce_direct(outputs[f"logits_{i}"].detach(), masks[i - 1]) for i in (1, 2)]
    assert total.item() == pytest.approx(sum(seg), rel=1e-6) and "loss_cons" not in log
    # a single level never has a consistency term
    total1, log1 = gaze_sup_loss(random_outputs(1, seed=11), masks[:1], cons_weight=1.0, cons_mode="prop")
    assert "loss_cons" not in log1 and log1["loss"] == pytest.approx(log1["loss_seg_1"])


def test_gaze_sup_reports_missing_levels():
    with pytest.raises(ValueError, match=r"logits_3"):
        gaze_sup_loss(random_outputs(2), _masks(3), cons_weight=1.0, cons_mode="prop")


def test_full_sup_loss():
    torch.manual_seed(4)
    logits, mask = torch.randn(2, 1, 6, 6), (torch.rand(2, 1, 6, 6) > 0.5).float()
    loss, log = full_sup_loss({"logits": logits}, mask)
    assert loss.item() == pytest.approx(bce_direct(logits, mask), rel=1e-5)
    assert log == {"loss": pytest.approx(loss.item())}


# ---------------------------------------------------------------- partial BCE (sparse labels)
def test_partial_bce_is_the_mean_over_labelled_pixels_by_hand():
    # image 0: labelled pixels (0,0)=1 at logit 2, (0,1)=0 at logit -1; image 1: one labelled pixel (1,1)=0 at 0.5
    logits = torch.tensor([[[[2.0, -1.0], [7.0, -9.0]]], [[[3.0, 4.0], [5.0, 0.5]]]], dtype=torch.float64)
    labels = torch.tensor([[[[1, 0], [255, 255]]], [[[255, 255], [255, 0]]]], dtype=torch.uint8)
    image0 = (-math.log(sigmoid(2.0)) - math.log(1 - sigmoid(-1.0))) / 2
    image1 = -math.log(1 - sigmoid(0.5))
    assert partial_bce_loss(logits, labels).item() == pytest.approx((image0 + image1) / 2, rel=1e-12)


def test_partial_bce_equals_plain_bce_when_every_pixel_is_labelled():
    g = torch.Generator().manual_seed(3)
    logits = 3 * torch.randn(3, 1, 7, 6, generator=g, dtype=torch.float64)
    labels = (torch.rand(3, 1, 7, 6, generator=g) < 0.4).to(torch.float64)
    assert partial_bce_loss(logits, labels).item() == pytest.approx(bce_loss(logits, labels).item(), rel=1e-12)


def test_partial_bce_refuses_an_image_without_labelled_pixels():
    labels = torch.full((2, 1, 3, 3), 255.0)
    labels[0, 0, 1, 1] = 1
    with pytest.raises(ValueError, match=r"image\(s\) \[1\].*no labelled pixel"):
        partial_bce_loss(torch.zeros(2, 1, 3, 3), labels)


def test_gaze_sup_loss_partial_leaves_the_consistency_term_unchanged():
    outputs = random_outputs(2, seed=4)
    g = torch.Generator().manual_seed(5)
    masks = [(torch.rand(2, 1, 6, 5, generator=g) < 0.5).double() for _ in range(2)]
    sparse = [torch.where(torch.rand(2, 1, 6, 5, generator=g) < 0.5, m, torch.full_like(m, 255)) for m in masks]
    for m in sparse:
        m[:, 0, 0, 0] = 1  # every image labelled somewhere
    _, dense_log = gaze_sup_loss(outputs, masks, 3.0, "prop")
    total, log = gaze_sup_loss(outputs, sparse, 3.0, "prop", partial=True)
    assert log["loss_cons"].item() == pytest.approx(dense_log["loss_cons"].item(), rel=1e-12)
    for i in (1, 2):
        labelled = sparse[i - 1] != 255
        assert log[f"loss_seg_{i}"].item() == pytest.approx(
            bce_direct(outputs[f"logits_{i}"].detach(), sparse[i - 1].clamp(max=1), labelled), rel=1e-9)
    assert total.item() == pytest.approx(log["loss_seg_1"] + log["loss_seg_2"] + 3.0 * 2 * log["loss_cons"], rel=1e-9)


def test_the_loss_ignores_the_value_the_datasets_write():
    """losses cannot import datasets (the layering): the two constants must agree."""
    from datasets.io import IGNORE as DATASETS_IGNORE
    from losses import IGNORE
    assert IGNORE == DATASETS_IGNORE
