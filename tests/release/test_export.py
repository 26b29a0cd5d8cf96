"""run.py export and the onnxruntime predict: the ONNX graph reproduces the torch predict (probabilities to
1e-4, identical masks) for 3-channel, 1-channel z-score (16-bit input) and {mean, std} specs, project and paper
checkpoints, at sizes other than spatial_size and in batches; the bundle's checksums and card; predict --model
never imports torch; bad bundles, models and images are one-line errors that write nothing."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import run
from engine.predict import build_parser as torch_predict_parser
from engine.predict import load_model, prepare, probability
from models.checkpoint import load_checkpoint, save_checkpoint
from release.onnx_predict import OnnxModel
from tests.helpers import NARROW, one_error_line, only_run_dir, random_checkpoint, tiny_argv

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("one_thread")
TOL = 1e-4


# ---------------------------------------------------------------- helpers
def torch_probabilities(ckpt: Path, images: list[np.ndarray], *flags: str) -> list[np.ndarray]:
    """What `run.py predict --ckpt_path` computes for each image (engine.predict's own functions)."""
    args = torch_predict_parser().parse_args(["--ckpt_path", str(ckpt), "--input", "x", "--out", "y", *flags])
    model, cfg = load_model(str(ckpt), args, torch.device("cpu"))
    with torch.no_grad():
        return [probability(model, prepare(im, cfg["data"], cfg["spatial_size"], Path("x")), im.shape[:2]).numpy()
                for im in images]


def assert_same_predictions(ckpt: Path, bundle: Path, images: list[np.ndarray], *flags: str) -> float:
    """ONNX vs torch, image by image and as one batch of the images cropped to a common size: max abs <= 1e-4,
    identical masks. Returns the largest difference."""
    model = OnnxModel(bundle / "model.onnx")
    ref = torch_probabilities(ckpt, images, *flags)
    worst = 0.0
    for image, expected in zip(images, ref):
        got = model.probability(image)
        assert got.shape == image.shape[:2]
        worst = max(worst, float(np.abs(got - expected).max()))
        np.testing.assert_array_equal(got > 0.5, expected > 0.5)
    h, w = min(im.shape[0] for im in images), min(im.shape[1] for im in images)
    crops = [im[:h, :w] for im in images]
    batch = np.stack([c.astype(np.float32) for c in crops])
    batch = batch.transpose(0, 3, 1, 2) if batch.ndim == 4 else batch[:, None]
    got = model.batch(batch, crops[0].dtype == np.uint8)
    assert got.shape == (len(images), 1, h, w)
    for g, expected in zip(got[:, 0], torch_probabilities(ckpt, crops, *flags)):
        worst = max(worst, float(np.abs(g - expected).max()))
        np.testing.assert_array_equal(g > 0.5, expected > 0.5)
    assert worst <= TOL, worst
    return worst


def checkpoint(path: Path, in_channels=3, data="kvasir", spatial_size=32, paper=False, seed=0,
               method="gaze_sup") -> Path:
    """tests.helpers.random_checkpoint, returning its path."""
    random_checkpoint(path, method, in_channels, data, spatial_size, paper, seed)
    return path


def export(ckpt: Path, out: Path, *flags: str) -> Path:
    assert run.cli(["export", "--ckpt_path", str(ckpt), "--out", str(out), "--quiet", *flags]) == 0
    return out


def cli_error(capsys, argv) -> str:
    """Exit status 2 and exactly one `error:` line on stderr; returns the line."""
    capsys.readouterr()
    assert run.cli(argv) == 2
    return one_error_line(capsys.readouterr().err)


def gray16(shape, seed) -> np.ndarray:
    """A smooth 16-bit gray image (a bright blob on a ramp, with noise), values well above 255."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    blob = np.exp(-((yy - shape[0] / 2) ** 2 + (xx - shape[1] / 3) ** 2) / (shape[0] * 2.0))
    return (900 + 20000 * blob + 40 * xx + rng.integers(0, 400, shape)).astype(np.uint16)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(checkpoint, bundle): a random narrow 3-channel model saved as this project does, and its export."""
    base = tmp_path_factory.mktemp("exported")
    ckpt = checkpoint(base / "model.pth")
    return ckpt, export(ckpt, base / "bundle")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_root):
    """(data root, run folder, bundle) of a 2-iteration tiny training run."""
    base = tmp_path_factory.mktemp("trained")
    exp = base / "exp"
    assert run.main(tiny_argv(data_root, exp, "--max_ite", "2", "--val_step", "2", "--quiet")) == 0
    run_dir = only_run_dir(exp)
    return data_root, run_dir, export(run_dir, base / "bundle")


# ---------------------------------------------------------------- the bundle
@pytest.mark.slow
def test_bundle_files_card_and_checksums(trained):
    root, run_dir, bundle = trained
    assert sorted(p.name for p in bundle.iterdir()) == ["SHA256SUMS", "model.onnx", "model_card.json",
                                                         "model_card.md", "weights.pth"]
    check = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=bundle, capture_output=True, text=True)
    assert check.returncode == 0 and check.stdout.count(": OK") == 4
    card = json.loads((bundle / "model_card.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert (card["method"], card["levels"], card["thresholds"], card["in_channels"], card["spatial_size"]) == \
        ("gaze_sup", 2, [0.5, 0.3], 3, 32)
    assert card["features"] == NARROW["features"] and card["feat_dim"] == 8
    assert card["data"]["name"] == "kvasir" and card["data"]["normalization"] == "imagenet"
    assert card["checkpoint"] == {"file": "model_best.pth", "iteration": 2, "which": "best",
                                  "selected_on": "test split"}
    assert card["metrics"]["final"]["mdice"] == metrics["final"]["mdice"]
    assert card["metrics"]["best"]["mhd95"] == metrics["best"]["test"]["mhd95"]
    ids = (root / "train.txt").read_text().split()
    assert card["training_split"]["ids"] == len(ids) == 8
    import hashlib
    assert card["training_split"]["ids_sha256"] == hashlib.sha256("".join(f"{i}\n" for i in ids).encode()).hexdigest()
    assert card["predict_threshold"] == 0.5 and card["flags"]["max_ite"] == 2 and card["unknown"] == []
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert card["code_commit"].startswith(head)
    md = (bundle / "model_card.md").read_text()
    assert "thresholds [0.5, 0.3]" in md and f"{metrics['final']['mdice']:.4f}" in md
    # weights.pth: the weights and the flags, nothing else (no optimiser), loadable with weights_only=True
    weights = torch.load(bundle / "weights.pth", weights_only=True)
    assert sorted(weights) == ["args", "data_spec", "iteration", "state_dict"]
    assert weights["data_spec"]["normalization"] == "imagenet" and weights["args"]["data"] == "kvasir"
    best = load_checkpoint(run_dir / "model_best.pth")
    assert all(torch.equal(weights["state_dict"][k], v) for k, v in best["state_dict"].items())


def test_onnx_predict_equals_torch_predict(exported, data_root, tmp_path):
    (ckpt, bundle), root = exported, data_root
    files = sorted((root / "images").glob("*.jpg"))[:3]
    images = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    assert len({im.shape for im in images}) > 1 and all(im.shape[:2] != (32, 32) for im in images)
    assert_same_predictions(ckpt, bundle, images)
    # the command line: same files, masks identical, probability PNGs within one grey level
    assert run.cli(["predict", "--model", str(bundle), "--input", *map(str, files), "--out", str(tmp_path / "o"),
                    "--save_prob", "--quiet"]) == 0
    assert run.cli(["predict", "--ckpt_path", str(ckpt), "--input", *map(str, files), "--out",
                    str(tmp_path / "t"), "--save_prob", "--quiet"]) == 0
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == sorted(p.name for p in (tmp_path / "t").iterdir())
    for f in files:
        for kind in ("mask", "overlay"):
            np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "o" / f"{f.stem}_{kind}.png")),
                                          np.asarray(Image.open(tmp_path / "t" / f"{f.stem}_{kind}.png")))
        a, b = (np.asarray(Image.open(tmp_path / d / f"{f.stem}_prob.png")).astype(int) for d in "ot")
        assert np.abs(a - b).max() <= 1


@pytest.mark.slow
def test_bundle_as_ckpt_path_for_test_and_predict(trained, tmp_path):
    root, run_dir, bundle = trained
    files = [str(p) for p in sorted((root / "images").glob("*.jpg"))[:2]]
    for ckpt, out in ((run_dir, "run"), (bundle, "bundle")):
        assert run.cli(["predict", "--ckpt_path", str(ckpt), "--input", *files, "--out", str(tmp_path / out),
                        "--quiet"]) == 0
    for f in map(Path, files):
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "run" / f"{f.stem}_mask.png")),
                                      np.asarray(Image.open(tmp_path / "bundle" / f"{f.stem}_mask.png")))
    # --test on the bundle reproduces the run's best metrics, its settings read from weights.pth and the card
    exp = tmp_path / "eval"
    assert run.cli(["--test", "--ckpt_path", str(bundle), "--root", str(root), "--exp_path", str(exp),
                    "--quiet"]) == 0
    result = json.loads(next(exp.rglob("metrics.json")).read_text())["test"]
    best = json.loads((run_dir / "metrics.json").read_text())["best"]["test"]
    assert result["mdice"] == pytest.approx(best["mdice"], abs=1e-12)


def test_one_channel_zscore_16bit(tmp_path):
    ckpt = checkpoint(tmp_path / "prostate.pth", in_channels=1, data="prostate")
    bundle = export(ckpt, tmp_path / "bundle")
    images = [gray16((48, 40), 0), gray16((45, 61), 1), gray16((52, 37), 2)]
    worst = assert_same_predictions(ckpt, bundle, images)
    assert worst <= TOL
    folder = tmp_path / "png16"
    folder.mkdir()
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / f"slice{i}.png")
        assert Image.open(folder / f"slice{i}.png").mode == "I;16"
    assert run.cli(["predict", "--model", str(bundle), "--input", str(folder), "--out", str(tmp_path / "o"),
                    "--quiet"]) == 0
    assert run.cli(["predict", "--ckpt_path", str(ckpt), "--input", str(folder), "--out", str(tmp_path / "t"),
                    "--quiet"]) == 0
    for i in range(3):
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "o" / f"slice{i}_mask.png")),
                                      np.asarray(Image.open(tmp_path / "t" / f"slice{i}_mask.png")))


def test_mean_std_spec_takes_the_bit_depth(tmp_path):
    """A 1-channel {mean, std} spec normalises x / 255 for 8-bit images and raw values for 16-bit ones: the
    graph's `divisor` input carries that, and both kinds match torch."""
    spec = tmp_path / "gray.yaml"
    spec.write_text("name: gray\nimage_ext: .png\nmask_ext: .png\ngaze_ext: .png\nin_channels: 1\n"
                    "normalization: {mean: [0.4], std: [0.2]}\nthresholds: {2: [0.5, 0.3]}\n")
    ckpt = checkpoint(tmp_path / "gray.pth", in_channels=1, data=str(spec))
    bundle = export(ckpt, tmp_path / "bundle")
    card = json.loads((bundle / "model_card.json").read_text())
    assert [i["name"] for i in card["onnx"]["inputs"]] == ["image", "divisor"]
    eight = [(gray16((40, 44), s) // 90).astype(np.uint8) for s in range(3)]
    assert_same_predictions(ckpt, bundle, eight)
    assert_same_predictions(ckpt, bundle, [gray16((40, 44), s) // 20 for s in range(3)])


def test_paper_checkpoint_exports_with_its_unknowns(tmp_path, capsys):
    ckpt = checkpoint(tmp_path / "paper.pth", paper=True)
    assert "--spatial_size" in cli_error(capsys, ["export", "--ckpt_path", str(ckpt), "--out", str(tmp_path / "no")])
    assert not (tmp_path / "no").exists()
    bundle = export(ckpt, tmp_path / "bundle", "--spatial_size", "40")
    card = json.loads((bundle / "model_card.json").read_text())
    assert card["spatial_size"] == 40 and card["in_channels"] == 3 and card["levels"] == 2
    assert card["metrics"] is None and card["training_split"]["ids"] is None
    assert card["checkpoint"]["which"].startswith("unknown") and card["checkpoint"]["best_performance_recorded"] == 0.5
    assert any("training split" in u for u in card["unknown"]) and any("kvasir" in u for u in card["unknown"])
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((50, 47), (33, 70), (64, 64))]
    assert_same_predictions(ckpt, bundle, images, "--spatial_size", "40")



def test_full_sup_checkpoint(tmp_path):
    ckpt = checkpoint(tmp_path / "full.pth", method="full_sup", spatial_size=48)
    bundle = export(ckpt, tmp_path / "bundle")
    card = json.loads((bundle / "model_card.json").read_text())
    assert (card["method"], card["levels"], card["thresholds"]) == ("full_sup", None, None)
    rng = np.random.default_rng(1)
    assert_same_predictions(ckpt, bundle, [rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                                           for h, w in ((30, 41), (57, 36), (48, 48))])

# ---------------------------------------------------------------- no torch
def test_onnx_predict_never_imports_torch(exported, data_root, tmp_path):
    """run.py predict --model in a fresh interpreter where `import torch` fails."""
    (_, bundle), root = exported, data_root
    code = ("import sys; sys.modules['torch'] = None\n"
            "import release.bundle, release.onnx_predict, engine.predict_io, common.checksums\n"
            "import run\n"
            "rc = run.cli(sys.argv[1:])\n"
            "assert 'torch' not in [m.split('.')[0] for m, v in sys.modules.items() if v is not None]\n"
            "sys.exit(rc)")
    out = tmp_path / "o"
    proc = subprocess.run([sys.executable, "-c", code, "predict", "--model", str(bundle), "--input",
                           str(root / "images"), "--out", str(out), "--quiet"], cwd=REPO, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    assert len(list(out.glob("*_mask.png"))) == len(list((root / "images").glob("*.jpg")))


# ---------------------------------------------------------------- bad input
def copy_bundle(bundle: Path, to: Path) -> Path:
    shutil.copytree(bundle, to)
    return to


@pytest.mark.parametrize("damage", ["onnx_byte", "weights_byte", "card_byte", "missing_card"])
def test_damaged_bundle_is_refused(exported, data_root, tmp_path, capsys, damage):
    (_, bundle), root = exported, data_root
    bad = copy_bundle(bundle, tmp_path / "bad")
    name = {"onnx_byte": "model.onnx", "weights_byte": "weights.pth", "card_byte": "model_card.json",
            "missing_card": "model_card.json"}[damage]
    if damage == "missing_card":
        (bad / name).unlink()
    else:
        data = bytearray((bad / name).read_bytes())
        data[len(data) // 2] ^= 0x01
        (bad / name).write_bytes(bytes(data))
    out = tmp_path / "out"
    for argv in (["predict", "--model", str(bad)], ["predict", "--ckpt_path", str(bad)]):
        line = cli_error(capsys, argv + ["--input", str(root / "images"), "--out", str(out)])
        assert str(bad / name) in line, line
        assert not out.exists()


def foreign_onnx(path: Path, shape=(1, 3, 224, 224)) -> Path:
    """An ONNX model from elsewhere: a fixed-size input named 'input' (a 1x1 convolution)."""
    import onnx
    from onnx import TensorProto, helper

    w = helper.make_tensor("w", TensorProto.FLOAT, [1, shape[1], 1, 1], [0.1] * shape[1])
    graph = helper.make_graph([helper.make_node("Conv", ["input", "w"], ["out"])], "foreign",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, list(shape))],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 1, *shape[2:]])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    return path


def test_foreign_onnx_wrong_channels_and_other_errors(exported, data_root, tmp_path, capsys):
    (ckpt, bundle), root = exported, data_root
    out = tmp_path / "out"
    images = ["--input", str(root / "images"), "--out", str(out)]
    line = cli_error(capsys, ["predict", "--model", str(foreign_onnx(tmp_path / "other.onnx"))] + images)
    assert "other.onnx" in line and "[1, 3, 224, 224]" in line and "expected input 'image'" in line
    # a gray image among colour ones, for a 3-channel model: refused before anything is written
    folder = tmp_path / "mixed"
    shutil.copytree(root / "images", folder)
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(folder / "zz_gray.png")
    for model in (["--model", str(bundle)], ["--ckpt_path", str(ckpt)]):
        line = cli_error(capsys, ["predict", *model, "--input", str(folder), "--out", str(out)])
        assert "zz_gray.png has 1 channel(s)" in line and "expects 3" in line
        assert not out.exists()
    # the bare model.onnx of a bundle runs (no card: threshold 0.5); a folder that is not a bundle does not
    assert run.cli(["predict", "--model", str(bundle / "model.onnx"), "--input", str(root / "images"), "--out",
                    str(tmp_path / "bare"), "--quiet"]) == 0
    assert "not an exported bundle" in cli_error(capsys, ["predict", "--model", str(root)] + images)
    assert "not both" in cli_error(capsys, ["predict", "--model", str(bundle), "--ckpt_path", str(ckpt)] + images)
    assert not out.exists()
    # export: an --out that is not empty, a bad threshold; nothing written
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    assert "not empty" in cli_error(capsys, ["export", "--ckpt_path", str(ckpt), "--out", str(tmp_path / "full")])
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == ["keep.txt"]
    assert "--threshold" in cli_error(capsys, ["export", "--ckpt_path", str(ckpt), "--out", str(tmp_path / "n"),
                                               "--threshold", "1"])
    assert not (tmp_path / "n").exists() and not list(tmp_path.glob(".*export-tmp"))


# ---------------------------------------------------------------- real Kvasir, the paper's widths
def kvasir_layout(kvasir: Path, root: Path, ids: list[str], gray16_spec: bool = False) -> Path:
    """A prepared layout of a few real Kvasir images whose gaze maps are their masks (training only has to run):
    RGB JPEGs as they are, or (gray16_spec) 16-bit gray PNGs (luminance * 257) with a per-image z-score spec."""
    for sub in ("images", "masks", "gaze/crf_compat1"):
        (root / sub).mkdir(parents=True)
    for i in ids:
        if gray16_spec:
            gray = np.asarray(Image.open(kvasir / "images" / f"{i}.jpg").convert("L")).astype(np.uint16) * 257
            Image.fromarray(gray).save(root / "images" / f"{i}.png")
        else:
            (root / "images" / f"{i}.jpg").symlink_to(kvasir / "images" / f"{i}.jpg")
        (root / "masks" / f"{i}.jpg").symlink_to(kvasir / "masks" / f"{i}.jpg")
        (root / "gaze" / "crf_compat1" / f"{i}.jpg").symlink_to(kvasir / "masks" / f"{i}.jpg")
    (root / "train.txt").write_text("\n".join(ids[:2]) + "\n")
    (root / "test.txt").write_text("\n".join(ids[2:]) + "\n")
    if gray16_spec:
        (root / "gray16.yaml").write_text("name: gray16\nimage_ext: .png\nmask_ext: .jpg\ngaze_ext: .jpg\n"
                                          "in_channels: 1\nnormalization: per_image_zscore\n"
                                          "crf: {sxy: 80, srgb: 13, compat: 1, n_iter: 10}\n"
                                          "thresholds: {2: [0.5, 0.3]}\n")
    return root


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["rgb", "gray16"])
def test_kvasir_paper_widths_onnx_equals_torch(kvasir_dir, tmp_path, kind):
    """Two-iteration runs at the paper's widths (64,128,256,512,1024,128) and 224 px on real Kvasir images:
    RGB (and its weights saved in the paper's format), or 16-bit gray with a per-image z-score spec."""
    ids = sorted(p.stem for p in (kvasir_dir / "images").glob("*.jpg"))[:5]
    root = kvasir_layout(kvasir_dir, tmp_path / kind, ids, gray16_spec=kind == "gray16")
    data = ["--data", str(root / "gray16.yaml"), "--in_channels", "1"] if kind == "gray16" else ["--data", "kvasir"]
    exp = tmp_path / "exp"
    assert run.main(["-m", "gaze_sup", *data, "--root", str(root), "--exp_path", str(exp), "--num_worker", "0",
                     "-bs", "2", "--opt", "sgd", "--lr", "1e-2", "--seed", "0", "--spatial_size", "224",
                     "--max_ite", "2", "--val_step", "2", "--quiet"]) == 0
    run_dir = next(p for p in exp.rglob("model_best.pth")).parent
    bundle = export(run_dir, tmp_path / "bundle")
    card = json.loads((bundle / "model_card.json").read_text())
    assert card["features"] == [64, 128, 256, 512, 1024, 128] and card["spatial_size"] == 224
    from datasets.io import read_image
    images = [read_image(p) for p in sorted((root / "images").iterdir())[2:]]
    assert all(im.shape[:2] != (224, 224) for im in images) and len({im.shape for im in images}) == 3
    assert (images[0].dtype, images[0].ndim) == ((np.uint16, 2) if kind == "gray16" else (np.uint8, 3))
    results = {kind: assert_same_predictions(run_dir / "model_best.pth", bundle, images)}
    if kind == "rgb":
        best = load_checkpoint(run_dir / "model_best.pth")
        paper = tmp_path / "paper.pth"
        save_checkpoint(paper, {"state_dict": best["state_dict"], "opt": {}, "epoch": 1, "iteration": 2,
                                "best_performance": np.float64(0.1), "best_iteration": 2})
        paper_bundle = export(paper, tmp_path / "bundle_paper", "--spatial_size", "224")
        results["paper"] = assert_same_predictions(paper, paper_bundle, images, "--spatial_size", "224")
    print("max abs probability difference, ONNX vs torch:", results,
          "image sizes:", [im.shape for im in images])
