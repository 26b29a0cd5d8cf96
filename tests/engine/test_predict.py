"""`python run.py predict`: masks at the original size equal to what evaluation predicts, overlays that
outline exactly the mask, probability maps, this project's and the paper's checkpoints, DICOM inputs,
and clear errors."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage

import run
from common.contours import PRED_COLOR, draw_contours
from common.dataspec import load_spec
from engine.predict import main as predict_main
from engine.visualize import denormalize
from models.checkpoint import infer_model_args, save_checkpoint
from models.segmentation_net import build_model
from tests.helpers import NARROW, one_error_line, only_run_dir, random_checkpoint, tiny_argv

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("one_thread")
WIDTHS = NARROW


def border(mask: np.ndarray) -> np.ndarray:
    """Mask pixels with a 4-neighbour outside the mask (scipy, independent of cv2)."""
    return mask & ~ndimage.binary_erosion(mask, ndimage.generate_binary_structure(2, 1), border_value=0)


def test_overlay_outlines_exactly_the_mask_border():
    yy, xx = np.mgrid[0:40, 0:50]
    mask = (yy - 20) ** 2 / 100 + (xx - 22) ** 2 / 200 <= 1
    mask[18:22, 20:24] = False  # a hole: its boundary is drawn too
    mask[5:8, 40:46] = True     # a second component
    image = np.full((40, 50, 3), 60, np.uint8)
    out = draw_contours(image, mask, PRED_COLOR)
    changed = (out != image).any(-1)
    np.testing.assert_array_equal(changed, border(mask))
    assert (out[changed] == PRED_COLOR).all()


def test_denormalize_inverts_the_kvasir_normalisation():
    image = np.random.RandomState(0).randint(0, 256, (20, 30, 3)).astype(np.uint8)
    back = denormalize(torch.from_numpy(load_spec("kvasir").normalize(image)))
    assert back.dtype == np.uint8 and np.abs(back.astype(int) - image).max() <= 1


def test_predict_equals_evaluation_with_save_pred(tmp_path, data_root):
    """Same resize, normalisation and upsampling as `run.py --test --save_pred` (a random model: mixed masks)."""
    ckpt = tmp_path / "random.pth"
    random_checkpoint(ckpt)
    argv = tiny_argv(data_root, tmp_path / "exp", "--test", "--ckpt_path", str(ckpt), "--save_pred", "--quiet")
    assert run.main(argv) == 0
    evaluated = only_run_dir(tmp_path / "exp") / "predictions" / "pred"
    test_ids = (data_root / "test.txt").read_text().split()
    out = tmp_path / "out"
    files = [str(data_root / "images" / f"{i}.jpg") for i in test_ids]
    assert predict_main(["--ckpt_path", str(ckpt), "--input", *files, "--out", str(out), "--save_prob",
                         "--device", "cpu", "--quiet"]) == 0
    fractions = []
    for i in test_ids:
        image = np.asarray(Image.open(data_root / "images" / f"{i}.jpg").convert("RGB"))
        mask = np.asarray(Image.open(out / f"{i}_mask.png"))
        assert mask.shape == image.shape[:2] and set(np.unique(mask)) <= {0, 255}
        np.testing.assert_array_equal(mask, np.asarray(Image.open(evaluated / f"{i}.png")))
        prob = np.asarray(Image.open(out / f"{i}_prob.png")).astype(int)
        assert prob.shape == mask.shape
        assert ((prob >= 127) | (mask == 0)).all() and ((prob <= 128) | (mask == 255)).all()  # mask = prob > 0.5
        overlay = np.asarray(Image.open(out / f"{i}_overlay.png"))
        changed = (overlay != image).any(-1)
        np.testing.assert_array_equal(changed, border(mask > 0))
        fractions.append((mask > 0).mean())
    assert 0 < np.mean(fractions) < 1, "the comparison needs masks that are neither empty nor full"


@pytest.mark.slow
def test_folder_input_and_trained_checkpoint(tmp_path, data_root):
    """A checkpoint from a real (tiny) training run, a folder as input, via the run.py command line."""
    exp = tmp_path / "exp"
    assert run.main(tiny_argv(data_root, exp, "--max_ite", "2", "--val_step", "2", "--quiet")) == 0
    run_dir = only_run_dir(exp)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "run.py", "predict", "--ckpt_path", str(run_dir), "--input",
                           str(data_root / "images"), "--out", str(out)], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    images = sorted((data_root / "images").glob("*.jpg"))
    assert f"{len(images)} image(s)" in proc.stdout
    for path in images:
        size = Image.open(path).size
        assert Image.open(out / f"{path.stem}_mask.png").size == size
        assert Image.open(out / f"{path.stem}_overlay.png").size == size
        assert not (out / f"{path.stem}_prob.png").exists()  # only with --save_prob


def test_project_and_paper_checkpoints_predict_the_same(tmp_path, data_root):
    files = [str(p) for p in sorted((data_root / "images").glob("*.jpg"))[:2]]
    ours, paper = tmp_path / "ours.pth", tmp_path / "paper.pth"
    random_checkpoint(ours, spatial_size=64)
    random_checkpoint(paper, paper=True)
    assert predict_main(["--ckpt_path", str(ours), "--input", *files, "--out", str(tmp_path / "a"), "--quiet"]) == 0
    # the paper's checkpoint records no flags: shape from the weights, input size from the command line
    assert predict_main(["--ckpt_path", str(paper), "--input", *files, "--out", str(tmp_path / "b"),
                         "--spatial_size", "64", "--quiet"]) == 0
    for f in map(Path, files):
        size = Image.open(f).size
        a = np.asarray(Image.open(tmp_path / "a" / f"{f.stem}_mask.png"))
        b = np.asarray(Image.open(tmp_path / "b" / f"{f.stem}_mask.png"))
        assert a.shape == (size[1], size[0]) and Image.open(tmp_path / "b" / f"{f.stem}_overlay.png").size == size
        np.testing.assert_array_equal(a, b)  # same weights, same pipeline


def test_infer_model_args_from_paper_keys():
    gaze = build_model("gaze_sup", num_levels=3, in_channels=1, features=[8, 8, 16, 16, 32, 12], feat_dim=4)
    assert infer_model_args(gaze.state_dict()) == {"method": "gaze_sup", "num_levels": 3, "in_channels": 1,
                                                   "features": [8, 8, 16, 16, 32, 12], "feat_dim": 4}
    full = build_model("full_sup", in_channels=3, features=[4, 8, 8, 16, 16, 8], feat_dim=8)
    ddp_keys = {"module." + k: v for k, v in full.state_dict().items()}
    assert infer_model_args(ddp_keys) == {"method": "full_sup", "in_channels": 3, "features": [4, 8, 8, 16, 16, 8],
                                          "feat_dim": 8}


def test_paper_full_sup_checkpoint(tmp_path, data_root):
    """A paper-format SegNet checkpoint (keys `encoder...`): predicted with the single network's logits."""
    ckpt = tmp_path / "full.pth"
    random_checkpoint(ckpt, method="full_sup", paper=True)
    image = data_root / "images" / "synth0000.jpg"
    assert predict_main(["--ckpt_path", str(ckpt), "--input", str(image), "--out", str(tmp_path / "o"),
                         "--spatial_size", "32", "--quiet"]) == 0
    assert Image.open(tmp_path / "o" / "synth0000_mask.png").size == Image.open(image).size


def write_dicom(path: Path, pixels: np.ndarray) -> None:
    """A minimal single-frame 16-bit MR slice (what TCIA's NCI-ISBI files are)."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = MRImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = MRImageStorage, meta.MediaStorageSOPInstanceUID, "MR"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    assert pydicom.dcmread(path).pixel_array.shape == pixels.shape


def test_dicom_input_with_a_one_channel_model(tmp_path):
    import pydicom
    ckpt = tmp_path / "prostate.pth"
    model = random_checkpoint(ckpt, in_channels=1, data="prostate", spatial_size=32).eval()
    folder = tmp_path / "dicom"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, shape in (("case_13", (48, 40)), ("case_16", (36, 52))):  # smooth 12-bit slices, two sizes
        yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
        blob = np.exp(-((yy - shape[0] / 2) ** 2 + (xx - shape[1] / 3) ** 2) / 80.0)
        write_dicom(folder / f"{name}.dcm", 400 + 3000 * blob + rng.integers(0, 200, shape))
    files = sorted(folder.glob("*.dcm"))
    assert predict_main(["--ckpt_path", str(ckpt), "--input", str(folder), "--out",
                         str(tmp_path / "out"), "--save_prob", "--quiet"]) == 0
    for f in files:
        pixels = pydicom.dcmread(str(f)).pixel_array.astype(np.float32)
        # independent pipeline: per-image standardisation, bilinear resize, level mean, bilinear back
        x = torch.from_numpy((pixels - pixels.mean()) / pixels.std())[None, None]
        x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
        with torch.no_grad():
            logits = model(x, propagate=False)["logits"]
        prob = torch.sigmoid(F.interpolate(logits, size=pixels.shape, mode="bilinear", align_corners=False))[0, 0]
        saved = np.asarray(Image.open(tmp_path / "out" / f"{f.stem}_prob.png")).astype(int)
        assert saved.shape == pixels.shape
        assert np.abs(saved - np.round(prob.numpy() * 255)).max() <= 1
        overlay = np.asarray(Image.open(tmp_path / "out" / f"{f.stem}_overlay.png"))
        assert overlay.shape == (*pixels.shape, 3)


def _error(capsys, argv) -> str:
    assert predict_main(argv) == 2
    return capsys.readouterr().err


def test_clear_errors(tmp_path, capsys, data_root):
    ckpt = tmp_path / "m.pth"
    random_checkpoint(ckpt)
    image = str(data_root / "images" / "synth0000.jpg")
    base = ["--ckpt_path", str(ckpt), "--out", str(tmp_path / "out")]
    missing = str(tmp_path / "missing.jpg")
    assert f"input not found: {missing}" in _error(capsys, base + ["--input", missing])
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8 not really a jpeg")
    assert str(corrupt) in _error(capsys, base + ["--input", str(corrupt)])
    assert "unsupported input" in _error(capsys, base + ["--input", str(data_root / "train.txt")])
    not_ckpt = ["--ckpt_path", str(data_root / "train.txt"), "--input", image, "--out", str(tmp_path / "o")]
    assert "corrupt or not a PyTorch checkpoint" in _error(capsys, not_ckpt)
    wrong = _error(capsys, base + ["--input", image, "--features", "8,8,16,16,32,16"])
    assert "--features [8, 8, 16, 16, 32, 16] (the run recorded [8, 8, 16, 16, 32, 8])" in wrong
    gray = tmp_path / "gray.png"
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(gray)
    msg = _error(capsys, base + ["--input", str(gray)])
    assert f"{gray} has 1 channel(s) but --data kvasir expects 3" in msg
    paper = tmp_path / "paper.pth"
    random_checkpoint(paper, paper=True)
    msg = _error(capsys, ["--ckpt_path", str(paper), "--input", image, "--out", str(tmp_path / "o")])
    assert "does not record the input size" in msg and "--spatial_size" in msg


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_matches_cpu(tmp_path, data_root):
    ckpt = tmp_path / "m.pth"
    random_checkpoint(ckpt)
    images = str(data_root / "images")
    for device in ("cpu", "cuda"):
        assert predict_main(["--ckpt_path", str(ckpt), "--input", images, "--out", str(tmp_path / device),
                             "--device", device, "--save_prob", "--quiet"]) == 0
    for f in sorted((tmp_path / "cpu").glob("*_prob.png")):
        a, b = (np.asarray(Image.open(tmp_path / d / f.name)).astype(int) for d in ("cpu", "cuda"))
        assert np.abs(a - b).max() <= 1


# ---------------------------------------------------------------- bad input: one line, exit 2, nothing touched
def _one_line_error(capsys, argv) -> str:
    """predict exits 2 with exactly one stderr line `error: ...` (no warning, no traceback); returns it."""
    assert predict_main(argv) == 2
    return one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("threshold", ["1.5", "0", "1", "-0.2", "nan"])
def test_threshold_must_be_a_probability(tmp_path, capsys, data_root, threshold):
    ckpt = tmp_path / "m.pth"
    random_checkpoint(ckpt)
    out = tmp_path / "out"
    msg = _one_line_error(capsys, ["--ckpt_path", str(ckpt), "--input", str(data_root / "images"), "--out",
                                   str(out), "--threshold", threshold])
    assert msg == f"error: --threshold is {float(threshold)}, expected a probability strictly between 0 and 1"
    assert not out.exists()


def test_out_that_is_a_file_or_unwritable(tmp_path, capsys, data_root):
    ckpt = tmp_path / "m.pth"
    random_checkpoint(ckpt)
    base = ["--ckpt_path", str(ckpt), "--input", str(data_root / "images" / "synth0000.jpg"), "--out"]
    taken = tmp_path / "results.png"
    taken.write_bytes(b"the user's file")
    msg = _one_line_error(capsys, base + [str(taken)])
    assert msg == f"error: --out {taken} is a file, expected a folder (new or existing) for the predictions"
    msg = _one_line_error(capsys, base + [str(taken / "sub")])
    assert msg == f"error: --out {taken / 'sub'}: {taken} is a file, so no folder can be created under it"
    assert taken.read_bytes() == b"the user's file"
    if Path("/sys").is_dir():  # sysfs refuses new files even to root (a chmod'ed folder would not stop root)
        assert _one_line_error(capsys, base + ["/sys"]).startswith("error: --out /sys: cannot write into it (")
        assert _one_line_error(capsys, base + ["/sys/preds"]).startswith(
            "error: --out /sys/preds: cannot create it in /sys (")
    blocked = tmp_path / "blocked"
    (blocked / "synth0000_mask.png").mkdir(parents=True)  # a folder where an output file goes
    msg = _one_line_error(capsys, base + [str(blocked)])
    assert msg.startswith(f"error: predicting into {blocked} stopped: [Errno 21] Is a directory: ")
    assert str(blocked / "synth0000_mask.png") in msg
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert "cannot write into it" in _one_line_error(capsys, base + [str(locked)])


def test_skipped_folder_entries_are_listed(tmp_path, capsys, data_root):
    """Other files, subfolders and broken links in an input folder: predicted around, counted and named."""
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("synth0000.jpg", "synth0001.jpg"):
        (folder / name).write_bytes((data_root / "images" / name).read_bytes())
    (folder / "notes.txt").write_text("x")
    (folder / "sub").mkdir()
    (folder / "sub" / "synth0002.jpg").write_bytes((data_root / "images" / "synth0002.jpg").read_bytes())
    (folder / "dead.jpg").symlink_to(tmp_path / "gone.jpg")
    ckpt = tmp_path / "m.pth"
    random_checkpoint(ckpt)
    out = tmp_path / "out"
    assert predict_main(["--ckpt_path", str(ckpt), "--input", str(folder), "--out", str(out), "--quiet"]) == 0
    captured = capsys.readouterr()
    expected = "warning: skipped 3 entries: dead.jpg (broken link), notes.txt (not jpg/jpeg/png/dcm), sub (folder)"
    assert captured.err.splitlines() == [expected]
    assert "2 image(s)" in captured.out
    assert sorted(p.name for p in out.iterdir()) == ["synth0000_mask.png", "synth0000_overlay.png",
                                                     "synth0001_mask.png", "synth0001_overlay.png"]
    for i in range(4):  # more than five: the first five and a count
        (folder / f"z{i}.txt").write_text("x")
    assert predict_main(["--ckpt_path", str(ckpt), "--input", str(folder), "--out", str(out), "--quiet"]) == 0
    assert capsys.readouterr().err.strip().endswith("z1.txt (not jpg/jpeg/png/dcm), ... (+2 more)")
    (folder / "synth0000.jpg").unlink()
    (folder / "synth0001.jpg").unlink()
    msg = _one_line_error(capsys, ["--ckpt_path", str(ckpt), "--input", str(folder), "--out", str(out)])
    assert msg.startswith(f"error: no jpg/jpeg/png/dcm files in folder {folder} (skipped 7 entries: dead.jpg")
    dead = _one_line_error(capsys, ["--ckpt_path", str(ckpt), "--input", str(folder / "dead.jpg"), "--out", str(out)])
    assert dead == f"error: input not found: {folder / 'dead.jpg'} is a broken link (to {tmp_path / 'gone.jpg'})"


def bad_checkpoint(path: Path, kind: str) -> Path:
    """Checkpoints that must be refused: not a dict, NaN weights, recorded flags for 0 levels, a code payload
    pickled with protocol 4 (torch's safe unpickler stops at protocol 4's first opcode)."""
    model = random_checkpoint(path)
    sd = model.state_dict()
    args = {"method": "gaze_sup", "num_levels": 2, "in_channels": 3, "data": "kvasir", "spatial_size": 32, **WIDTHS}
    if kind == "list":
        torch.save([sd], path)
    elif kind == "tensor":
        torch.save(next(iter(sd.values())), path)
    elif kind == "nan":
        sd = {k: v.clone() for k, v in sd.items()}
        sd["model.1.encoder.final_conv.weight"].fill_(float("nan"))
        save_checkpoint(path, {"state_dict": sd, "args": args})
    elif kind == "levels0":
        save_checkpoint(path, {"state_dict": sd, "args": {**args, "num_levels": 0}})
    elif kind == "payload4":
        import pickle

        class Payload:
            def __reduce__(self):
                return (os.mkdir, (str(path.parent / "pwned"),))

        with open(path, "wb") as f:
            pickle.dump({"state_dict": sd, "x": Payload()}, f, protocol=4)
    return path


CHECKPOINT_ERRORS = {"list": "holds a list, not a checkpoint",
                     "tensor": "holds a Tensor, not a checkpoint",
                     "nan": "refused: the weights are not finite (1 of 176 tensors; "
                            "'model.1.encoder.final_conv.weight' holds NaN)",
                     "levels0": "the recorded flag num_levels is 0, expected an integer >= 1",
                     "payload4": "refused: holds objects other than tensors ("}


@pytest.mark.parametrize("kind", sorted(CHECKPOINT_ERRORS))
def test_bad_checkpoints_are_refused_by_predict_and_test(tmp_path, capsys, data_root, kind):
    from models.checkpoint import CheckpointError

    ckpt = bad_checkpoint(tmp_path / "bad.pth", kind)
    before = ckpt.read_bytes()
    out = tmp_path / "out"
    msg = _one_line_error(capsys, ["--ckpt_path", str(ckpt), "--input", str(data_root / "images"), "--out", str(out)])
    assert msg.startswith(f"error: {ckpt}: {CHECKPOINT_ERRORS[kind]}"), msg
    with pytest.raises(CheckpointError) as err:  # run.py --test: the same error (run.py turns it into exit 2)
        run.main(tiny_argv(data_root, tmp_path / "exp", "--test", "--ckpt_path", str(ckpt), "--quiet"))
    assert str(err.value).startswith(f"{ckpt}: {CHECKPOINT_ERRORS[kind]}")
    assert ckpt.read_bytes() == before and not out.exists() and not (tmp_path / "pwned").exists()
