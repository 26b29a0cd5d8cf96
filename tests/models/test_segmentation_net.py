"""Models against the MONAI oracle: the paper's wrapper around monai's BasicUNet, saved in the
paper's checkpoint format, must load into our networks and give the same outputs. Only those tests
need monai; the rest (levels, outputs, gradients, ensembling, propagation choice, errors) run without it."""
import copy
import importlib.util

import numpy as np
import pytest
import torch
from torch import nn

from common.errors import UserError
from models import (
    BasicUNet,
    MultiLevelNet,
    SegNet,
    build_model,
    checkpoint_state_dict,
    ensemble_segnet,
    feature_propagation,
    load_checkpoint,
    load_model_state,
)

needs_monai = pytest.mark.skipif(importlib.util.find_spec("monai") is None, reason="needs monai (the oracle)")

PAPER = (64, 128, 256, 512, 1024, 128)
TINY = (8, 8, 16, 16, 32, 8)  # every width a multiple of num_groups=4
TINY_FEAT = 8


class PaperNet(nn.Module):
    """The paper's per-level network, built on monai (the oracle)."""

    def __init__(self, in_chns: int, features, feat_dim: int):
        super().__init__()
        from monai.networks.nets import BasicUNet as MonaiBasicUNet  # only the tests marked needs_monai get here
        self.encoder = MonaiBasicUNet(spatial_dims=2, in_channels=in_chns, out_channels=feat_dim,
                                            features=features, norm=("group", {"num_groups": 4}))
        self.head = nn.Sequential(nn.Conv2d(feat_dim, feat_dim, 1), nn.LeakyReLU(0.1),
                                  nn.Conv2d(feat_dim, feat_dim, 1))
        self.classifier = nn.Conv2d(feat_dim, 1, 1)

    def forward(self, x):
        feature = self.encoder(x)
        return {"logits": self.classifier(feature), "feature": feature}


class PaperMulti(nn.Module):
    def __init__(self, levels):
        super().__init__()
        self.model = nn.ModuleList(levels)


def randomized_paper_net(seed: int, features=TINY, feat_dim=TINY_FEAT) -> PaperNet:
    """A PaperNet with seed-specific weights, including non-trivial GroupNorm affines."""
    torch.manual_seed(seed)
    net = PaperNet(3, features, feat_dim)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.GroupNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.2)
    return net.eval()


def save_paper_checkpoint(path, model: nn.Module) -> None:
    """The paper's checkpoint dict, written by plain torch.save as the authors' code does."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    torch.save({"state_dict": model.state_dict(), "opt": opt.state_dict(), "epoch": 7, "iteration": 1234,
                "best_performance": np.float64(0.8123), "best_iteration": 1100}, path)


def keys_and_shapes(module: nn.Module) -> list[tuple[str, tuple]]:
    return [(k, tuple(v.shape)) for k, v in module.state_dict().items()]


@needs_monai
@pytest.mark.slow
def test_paper_widths_match_monai_keys_shapes_and_outputs():
    from monai.networks.nets import BasicUNet as MonaiBasicUNet
    torch.manual_seed(0)
    oracle = MonaiBasicUNet(spatial_dims=2, in_channels=3, out_channels=128, features=PAPER,
                                  norm=("group", {"num_groups": 4})).eval()
    ours = BasicUNet().eval()  # defaults are the paper's
    assert keys_and_shapes(ours) == keys_and_shapes(oracle)
    # the paper's upcat_1 keeps all channels when upsampling (halves=False)
    assert ours.upcat_1.upsample.deconv.weight.shape == (128, 128, 2, 2)
    ours.load_state_dict(oracle.state_dict(), strict=True)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert (ours(x) - oracle(x)).abs().max().item() <= 1e-5
    # the wrapper's keys as well
    assert keys_and_shapes(SegNet()) == keys_and_shapes(PaperNet(3, PAPER, 128))


@needs_monai
@pytest.mark.parametrize("size", [(48, 64), (35, 33)])  # 35x33: odd sizes exercise MONAI's replicate pad
def test_full_sup_loads_paper_checkpoint_and_matches_monai(tmp_path, size):
    oracle = randomized_paper_net(seed=1)
    path = tmp_path / "model_best.pth"
    save_paper_checkpoint(path, oracle)

    ckpt = load_checkpoint(path)
    assert isinstance(ckpt["best_performance"], np.float64)
    ours = build_model("full_sup", in_channels=3, features=TINY, feat_dim=TINY_FEAT).eval()
    load_model_state(ours, checkpoint_state_dict(ckpt), path)

    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        want, got = oracle(x), ours(x)
    assert got["logits"].shape == (2, 1, *size)
    assert (got["logits"] - want["logits"]).abs().max().item() <= 1e-5
    assert (got["feature"] - want["feature"]).abs().max().item() <= 1e-5


@needs_monai
def test_gaze_sup_two_levels_loads_paper_checkpoint_and_matches_monai(tmp_path):
    levels = [randomized_paper_net(seed=10), randomized_paper_net(seed=11)]
    w0, w1 = (lv.encoder.conv_0.conv_0.conv.weight for lv in levels)
    assert not torch.equal(w0, w1)  # the oracle levels really differ
    path = tmp_path / "model_best.pth"
    save_paper_checkpoint(path, PaperMulti(levels))

    ours = build_model("gaze_sup", num_levels=2, features=TINY, feat_dim=TINY_FEAT).eval()
    load_model_state(ours, checkpoint_state_dict(load_checkpoint(path)), path)

    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        got = ours(x)
        for i, level in enumerate(levels, start=1):
            want = level(x)
            assert (got[f"logits_{i}"] - want["logits"]).abs().max().item() <= 1e-5
            assert (got[f"feature_{i}"] - want["feature"]).abs().max().item() <= 1e-5
            prop = feature_propagation(want["feature"])
            assert (got[f"feature_prop_{i}"] - prop).abs().max().item() <= 1e-5
            assert (got[f"logits_prop_{i}"] - level.classifier(prop)).abs().max().item() <= 1e-5
        mean = (levels[0](x)["logits"] + levels[1](x)["logits"]) / 2
    assert (got["logits"] - mean).abs().max().item() <= 1e-5


def test_multilevel_levels_start_identical_but_independent():
    net = MultiLevelNet(num_levels=3, features=TINY, feat_dim=TINY_FEAT)
    assert [k for k, _ in keys_and_shapes(net)][:1] == ["model.0.encoder.conv_0.conv_0.conv.weight"]
    sds = [lv.state_dict() for lv in net.model]
    for sd in sds[1:]:
        assert all(torch.equal(sd[k], sds[0][k]) for k in sd)
    with torch.no_grad():
        net.model[1].classifier.weight.add_(1.0)
    assert not torch.equal(net.model[1].classifier.weight, net.model[0].classifier.weight)


def test_multilevel_outputs_and_propagate_flag():
    torch.manual_seed(0)
    net = MultiLevelNet(num_levels=2, features=TINY, feat_dim=TINY_FEAT).eval()
    with torch.no_grad():
        for p in net.model[1].parameters():
            p.add_(0.05 * torch.randn_like(p))
        x = torch.randn(1, 3, 32, 32)
        full = net(x)
        light = net(x, propagate=False)
    assert set(full) == {"logits"} | {f"{k}_{i}" for i in (1, 2)
                                      for k in ("logits", "feature", "feature_prop", "logits_prop")}
    assert set(light) == {"logits", "logits_1", "logits_2", "feature_1", "feature_2"}
    assert torch.allclose(light["logits"], full["logits"])
    assert torch.allclose(full["logits"], (full["logits_1"] + full["logits_2"]) / 2)
    assert not torch.allclose(full["logits_1"], full["logits_2"])


def test_multilevel_calls_the_chosen_propagation(monkeypatch):
    """propagation= picks the function that makes feature_prop_i; the default is feature_propagation.
    It carries no state: models built with different choices share one state-dict layout."""
    calls = []

    def mirror(feature: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(feature.shape))
        return feature.flip(-1)

    torch.manual_seed(0)
    net = build_model("gaze_sup", num_levels=2, features=TINY, feat_dim=TINY_FEAT, propagation=mirror).eval()
    default = build_model("gaze_sup", num_levels=2, features=TINY, feat_dim=TINY_FEAT).eval()
    default.load_state_dict(net.state_dict())  # strict: the same keys
    assert net.propagation == "mirror" and default.propagation == "torch"
    assert default.propagate_fn is feature_propagation
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out, ref = net(x), default(x)
        assert calls == [(2, TINY_FEAT, 32, 32)] * 2
        net(x, propagate=False)
        assert len(calls) == 2  # evaluation never propagates
        for i in (1, 2):
            assert torch.equal(out[f"feature_prop_{i}"], out[f"feature_{i}"].flip(-1))
            assert torch.equal(out[f"logits_prop_{i}"], net.model[i - 1].classifier(out[f"feature_{i}"].flip(-1)))
            assert torch.equal(ref[f"feature_prop_{i}"], feature_propagation(ref[f"feature_{i}"]))
    # full_sup never propagates: a name it cannot run on this machine is accepted, an unknown one is not
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert isinstance(build_model("full_sup", features=TINY, feat_dim=TINY_FEAT, propagation="triton"), SegNet)
    for method in ("gaze_sup", "full_sup"):
        with pytest.raises(UserError, match=r"--propagation 'fast': expected one of torch, triton"):
            build_model(method, features=TINY, feat_dim=TINY_FEAT, propagation="fast")


def test_gradients_reach_every_level():
    net = MultiLevelNet(num_levels=2, features=TINY, feat_dim=TINY_FEAT)
    out = net(torch.randn(2, 3, 32, 32))
    (out["logits"].mean() + out["logits_prop_1"].mean() + out["logits_prop_2"].mean()).backward()
    for i, level in enumerate(net.model):
        g = level.encoder.conv_0.conv_0.conv.weight.grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, f"level {i}"
        assert level.head[0].weight.grad is None  # head is unused in forward, as in the paper


def test_ensemble_parameters_are_level_means():
    torch.manual_seed(0)
    net = MultiLevelNet(num_levels=3, features=TINY, feat_dim=TINY_FEAT)
    with torch.no_grad():
        for lv in net.model:
            for p in lv.parameters():
                p.copy_(torch.randn_like(p))
    before = copy.deepcopy(net.state_dict())
    merged = ensemble_segnet(net)
    assert isinstance(merged, SegNet)
    sd = merged.state_dict()
    assert keys_and_shapes(merged) == keys_and_shapes(net.model[0])
    for k, v in sd.items():
        want = sum(before[f"model.{i}.{k}"].double() for i in range(3)) / 3
        assert torch.allclose(v.double(), want, atol=1e-6), k
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())  # input untouched


def test_bad_configurations_fail_clearly():
    with pytest.raises(ValueError, match="unknown method 'weak'"):
        build_model("weak")
    with pytest.raises(ValueError, match=r"multiple of num_groups=4.*\[6\]"):
        BasicUNet(features=(8, 8, 16, 16, 32, 6))
    with pytest.raises(ValueError, match="6 widths"):
        BasicUNet(features=(8, 8, 16))
    with pytest.raises(ValueError, match=r"H, W >= 16.*\(1, 3, 8, 32\)"):
        BasicUNet(features=TINY, out_channels=4)(torch.randn(1, 3, 8, 32))
    with pytest.raises(ValueError, match="num_levels"):
        MultiLevelNet(num_levels=0)


def test_training_step_under_bf16_autocast_gives_float32_loss():
    from losses import gaze_sup_loss
    torch.manual_seed(0)
    net = MultiLevelNet(num_levels=2, features=TINY, feat_dim=TINY_FEAT)
    masks = [(torch.rand(2, 1, 32, 32) > 0.5).float() for _ in range(2)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(torch.randn(2, 3, 32, 32))
        total, log = gaze_sup_loss(out, masks, cons_weight=1.0, cons_mode="prop")
    assert out["logits_1"].dtype == torch.bfloat16 and total.dtype == torch.float32
    assert set(log) == {"loss_seg_1", "loss_seg_2", "loss_cons", "loss"}
    total.backward()
    assert torch.isfinite(net.model[0].classifier.weight.grad).all()
