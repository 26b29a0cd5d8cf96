"""python -m prepare nci-isbi: synthetic TCIA-like trees (pydicom + pynrrd) and the real labels."""
import csv
import shutil
from pathlib import Path

import nrrd
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from datasets.io import DataError, read_dicom, read_gray
from prepare.cli import main
from prepare.nci_isbi import check_slice_geometry, prepare_nci_isbi

# ---------------------------------------------------------------- synthetic data

AXIAL = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0))
TILT = np.deg2rad(17.0)  # an oblique series, like the real Prostate3T-01-0001
OBLIQUE = ((1.0, 0.0, 0.0), (0.0, np.cos(TILT), np.sin(TILT)))


def geometry(rows=12, cols=10, n=6, orient=OBLIQUE, spacing=(0.6, 0.7), step=4.0, first=(-90.0, -80.0, -40.0)):
    row_dir, col_dir = np.array(orient[0]), np.array(orient[1])
    return dict(rows=rows, cols=cols, n=n, row_dir=row_dir, col_dir=col_dir, normal=np.cross(row_dir, col_dir),
                spacing=spacing, step=step, first=np.array(first))


def position(g, k):
    """ImagePositionPatient of InstanceNumber k."""
    return g["first"] + (k - 1) * g["step"] * g["normal"]


def write_series(folder: Path, case: str, g, rng, patient_id=None, n=None) -> dict:
    """A DICOM series of N (default g["n"]) MR slices under FOLDER with shuffled file names; {k: path}."""
    folder.mkdir(parents=True)
    n = g["n"] if n is None else n
    series_uid, study_uid = generate_uid(), generate_uid()
    names = rng.permutation(n) + 1  # file i-XX.dcm is *not* InstanceNumber XX
    paths = {}
    for k in range(1, n + 1):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality = "MR"
        ds.PatientID = case if patient_id is None else patient_id
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.InstanceNumber = k
        ds.ImagePositionPatient = [f"{v:.6f}" for v in position(g, k)]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*g["row_dir"], *g["col_dir"])]
        ds.PixelSpacing = [g["spacing"][0], g["spacing"][1]]  # (between rows, between columns)
        ds.SliceThickness = g["step"]
        ds.Rows, ds.Columns = g["rows"], g["cols"]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = rng.integers(0, 4000, (g["rows"], g["cols"]), dtype=np.uint16).tobytes()
        paths[k] = folder / f"1-{names[k - 1]:02d}.dcm"
        ds.save_as(paths[k], enforce_file_format=True)
    return paths


def nrrd_header(g, corner=False) -> dict:
    """NRRD geometry of the series: axis 0 along the rows, axis 1 along the columns, axis 2 the slices.
    corner=True puts the origin at the corner of the first voxel, as the challenge's label files do."""
    directions = np.stack([g["spacing"][1] * g["row_dir"], g["spacing"][0] * g["col_dir"], g["step"] * g["normal"]])
    origin = g["first"] - 0.5 * directions.sum(axis=0) if corner else g["first"]
    return {"space": "left-posterior-superior", "space directions": directions, "space origin": origin,
            "sizes": np.array([g["cols"], g["rows"], g["n"]])}


def write_label(path: Path, g, rng, n=None, corner=False, empty=(1,)) -> np.ndarray:
    """A random 0/1/2 label volume (cols, rows, n) with the slices in EMPTY (1-based) all zero."""
    n = g["n"] if n is None else n
    shape = (g["cols"], g["rows"], n)
    label = (rng.random(shape) < 0.3).astype(np.uint8) * rng.integers(1, 3, shape, dtype=np.uint8)
    for k in empty:
        label[:, :, k - 1] = 0
    header = nrrd_header(dict(g, n=n), corner)
    path.parent.mkdir(parents=True, exist_ok=True)
    nrrd.write(str(path), label, {k: v for k, v in header.items() if k != "sizes"})
    return label


def expected_mask(label, k):
    """The spec's formula, written out: pixel (row y, column x) = 255 if label[x, y, k-1] >= 1."""
    y, x = np.indices((label.shape[1], label.shape[0]))
    return ((label[x, y, k - 1] >= 1) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def tcia(tmp_path_factory):
    """A TCIA-like download with: an oblique case (corner-origin NRRD, plus a 3-slice localiser series),
    an axial case found only by folder name (PatientID blanked, centre-origin NRRD), a slice-count
    mismatch (label 4 slices, DICOM 6), a labelled case without a series, and a test case ("_truth").
    Label file suffixes follow the real files (ProstateDx-01-0006_correctedLabels.nrrd)."""
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("tcia")
    dicom = root / "NCI-ISBI 2013 prostate"
    g1 = geometry()
    g2 = geometry(rows=14, cols=14, n=5, orient=AXIAL, spacing=(0.625, 0.625), step=3.6, first=(-105.0, -92.0, 12.0))
    g3 = geometry(n=6, orient=AXIAL)
    cases = {
        "Prostate3T-01-0001": dict(g=g1, corner=True, empty=(1, 6), split="train"),
        "ProstateDx-01-0002": dict(g=g2, corner=False, empty=(1, 3), split="train", patient_id="ANON",
                                   suffix="_correctedLabels"),
        "ProstateDx-01-0055": dict(g=g3, corner=True, empty=(), split="train", label_n=4),
        "Prostate3T-01-0004": dict(g=g1, corner=True, empty=(1,), split="train", no_series=True),
        "Prostate3T-03-0001": dict(g=g2, corner=True, empty=(5,), split="test"),
    }
    files, labels = {}, {}
    for case, c in cases.items():
        folder = "labels/nrrd" if c["split"] == "train" else "labels-test/Leaderboard"
        name = f"{case}{c.get('suffix', '')}.nrrd" if c["split"] == "train" else f"{case}_truth.nrrd"
        labels[case] = write_label(root / folder / name, c["g"], rng, c.get("label_n"), c["corner"], c["empty"])
        if not c.get("no_series"):
            series_dir = dicom / case / "1.3.6.1-study" / "3.000000-t2tsetra-12345"
            files[case] = write_series(series_dir, case, c["g"], rng, c.get("patient_id"))
    write_series(dicom / "Prostate3T-01-0001" / "1.3.6.1-study" / "1.000000-localizer-111", "Prostate3T-01-0001",
                 geometry(n=3, orient=AXIAL), rng)
    (dicom / "metadata.csv").write_text("not,a,dicom\n")
    return dict(root=root, dicom=dicom, labels=root / "labels", test_labels=root / "labels-test", cases=cases,
                files=files, label=labels, g1=g1, g2=g2)


@pytest.fixture(scope="module")
def prepared(tcia, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    result = prepare_nci_isbi(tcia["labels"], out, dicom=tcia["dicom"], test_labels=tcia["test_labels"], seed=0)
    return out, result


# ---------------------------------------------------------------- the prepare command on synthetic data

def test_kept_slices_are_the_nonempty_label_slices(tcia, prepared):
    out, result = prepared
    want = {"train": [], "test": []}
    for case in ("Prostate3T-01-0001", "ProstateDx-01-0002", "Prostate3T-03-0001"):
        label = tcia["label"][case]
        want[tcia["cases"][case]["split"]] += [f"{case}_{k}" for k in range(1, label.shape[2] + 1)
                                               if (label[:, :, k - 1] >= 1).any()]
    assert sorted(result["train"]) == sorted(want["train"]) and len(want["train"]) == 4 + 3
    assert result["test"] == want["test"] and len(want["test"]) == 4  # test keeps slice order
    assert (out / "train.txt").read_text().split() == result["train"]
    assert (out / "test.txt").read_text().split() == result["test"]
    assert sorted(p.stem for p in (out / "masks").glob("*.png")) == sorted(want["train"] + want["test"])
    assert sorted(p.stem for p in (out / "images").glob("*.dcm")) == sorted(want["train"] + want["test"])


def test_masks_are_transposed_label_slices(tcia, prepared):
    out, result = prepared
    for sid in result["train"] + result["test"]:
        case, k = sid.rsplit("_", 1)
        mask = np.asarray(Image.open(out / "masks" / f"{sid}.png"))
        assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
        np.testing.assert_array_equal(mask, expected_mask(tcia["label"][case], int(k)))


def test_images_are_the_dicom_of_instance_number_k(tcia, prepared):
    out, result = prepared
    for sid in result["train"] + result["test"]:
        case, k = sid.rsplit("_", 1)
        copied = out / "images" / f"{sid}.dcm"
        assert copied.read_bytes() == tcia["files"][case][int(k)].read_bytes()
        assert int(pydicom.dcmread(copied).InstanceNumber) == int(k)
        # the image/mask pair loads with equal sizes, as the prostate dataset reads it
        assert read_dicom(copied).shape == read_gray(out / "masks" / f"{sid}.png").shape
    # file names were shuffled, so name order would have paired differently
    files = tcia["files"]["Prostate3T-01-0001"]
    assert any(files[k].name != f"1-{k:02d}.dcm" for k in files)


def test_mismatch_and_missing_series_are_skipped_with_warning(prepared, capsys):
    out, result = prepared
    assert set(result["skipped"]) == {"ProstateDx-01-0055", "Prostate3T-01-0004"}
    assert "slice count mismatch" in result["skipped"]["ProstateDx-01-0055"]
    assert "4 slices" in result["skipped"]["ProstateDx-01-0055"] and "[6]" in result["skipped"]["ProstateDx-01-0055"]
    assert "no DICOM series" in result["skipped"]["Prostate3T-01-0004"]
    assert not any(sid.startswith(("ProstateDx-01-0055", "Prostate3T-01-0004")) for sid in result["train"])
    assert result["geometry"] == [] and result["unreadable"] == 1  # metadata.csv


def test_train_shuffle_is_seeded(tcia, tmp_path):
    a = prepare_nci_isbi(tcia["labels"], tmp_path / "a", masks_only=True, seed=0)["train"]
    b = prepare_nci_isbi(tcia["labels"], tmp_path / "b", masks_only=True, seed=0)["train"]
    c = [prepare_nci_isbi(tcia["labels"], tmp_path / f"s{s}", masks_only=True, seed=s)["train"] for s in (1, 2, 3)]
    assert a == b
    assert any(x != a for x in c) and all(sorted(x) == sorted(a) for x in c)


def test_geometry_mismatch_is_reported_and_skipped(tcia, tmp_path, capsys):
    """A label volume shifted by one slice along its axis pairs with the wrong DICOMs: caught for every slice."""
    rng = np.random.default_rng(1)
    g = tcia["g1"]
    labels = tmp_path / "labels"
    shifted = dict(g, first=g["first"] + g["step"] * g["normal"])
    write_label(labels / "Prostate3T-01-0001.nrrd", shifted, rng, corner=True)
    result = prepare_nci_isbi(labels, tmp_path / "out", dicom=tcia["dicom"])
    assert "Prostate3T-01-0001" in result["skipped"] and result["train"] == []
    assert len(result["geometry"]) == g["n"] and "geometry mismatch" in result["skipped"]["Prostate3T-01-0001"]
    assert capsys.readouterr() == ("", "")  # the function reports nothing itself: the CLI does, once
    kept = prepare_nci_isbi(labels, tmp_path / "kept", dicom=tcia["dicom"], ignore_geometry=True)
    assert kept["skipped"] == {} and len(kept["geometry"]) == g["n"] and kept["train"]
    assert len(kept["kept_despite"]["Prostate3T-01-0001"]) == g["n"]
    args = ["nci-isbi", "--labels", str(labels), "--dicom", str(tcia["dicom"]), "--out", str(tmp_path / "cli")]
    assert main(args) == 0
    printed = capsys.readouterr()
    both = printed.out + printed.err
    assert both.count("Prostate3T-01-0001") == 1  # skipped: one line, not a warning and a summary
    assert "skipped Prostate3T-01-0001: series" in printed.out and "geometry mismatch" in printed.out
    assert main(args + ["--ignore-geometry"]) == 0
    printed = capsys.readouterr()
    assert printed.err.count("Prostate3T-01-0001") == 1 and "kept (--ignore-geometry)" in printed.err
    assert f"(+{g['n'] - 1} more)" in printed.err


def test_duplicate_instance_number_skips_the_case(tcia, tmp_path):
    rng = np.random.default_rng(2)
    g = tcia["g2"]
    write_label(tmp_path / "labels" / "ProstateDx-01-0009.nrrd", g, rng)
    paths = write_series(tmp_path / "dicom" / "ProstateDx-01-0009" / "s", "ProstateDx-01-0009", g, rng)
    ds = pydicom.dcmread(paths[2])
    ds.InstanceNumber = 3
    ds.save_as(paths[2])
    result = prepare_nci_isbi(tmp_path / "labels", tmp_path / "out", dicom=tmp_path / "dicom")
    assert "InstanceNumber 3 appears twice" in result["skipped"]["ProstateDx-01-0009"]


def test_masks_only_and_exclude(tcia, tmp_path):
    result = prepare_nci_isbi(tcia["labels"], tmp_path, masks_only=True, exclude=["ProstateDx-01-0055"])
    label = tcia["label"]["Prostate3T-01-0004"]  # no DICOMs needed
    assert {f"Prostate3T-01-0004_{k}" for k in range(2, label.shape[2] + 1)} <= set(result["train"])
    assert not any(s.startswith("ProstateDx-01-0055") for s in result["train"]) and result["test"] == []
    assert not (tmp_path / "images").exists()
    assert (tmp_path / "test.txt").read_text() == ""


@pytest.mark.parametrize("kwargs, message", [
    (dict(masks_only=False), "--dicom"),
    (dict(masks_only=True, dicom="x"), "--masks-only"),
    (dict(masks_only=True, exclude=["Nope-01"]), "--exclude Nope-01"),
])
def test_bad_arguments_raise(tcia, tmp_path, kwargs, message):
    with pytest.raises(DataError, match=message):
        prepare_nci_isbi(tcia["labels"], tmp_path, **kwargs)


def test_case_in_train_and_test_labels_raises(tcia, tmp_path):
    with pytest.raises(DataError, match="both the training"):
        prepare_nci_isbi(tcia["labels"], tmp_path, test_labels=tcia["labels"], masks_only=True)


def test_cli(tcia, tmp_path, capsys):
    args = ["nci-isbi", "--labels", str(tcia["labels"]), "--test-labels", str(tcia["test_labels"]),
            "--dicom", str(tcia["dicom"]), "--out", str(tmp_path)]
    assert main(args) == 0
    printed = capsys.readouterr()
    assert "11 slices, 7 train, 4 test, 2 case(s) skipped" in printed.out
    assert "skipped ProstateDx-01-0055: slice count mismatch" in printed.out
    assert main(["nci-isbi", "--labels", str(tmp_path / "none"), "--masks-only", "--out", str(tmp_path)]) == 2
    assert "label folder not found" in capsys.readouterr().err


# ---------------------------------------------------------------- the geometry check

@pytest.mark.parametrize("corner", [False, True])
def test_geometry_check_pairs_slice_k_only(tcia, corner):
    g = tcia["g1"]
    header = nrrd_header(g, corner)
    for k, path in tcia["files"]["Prostate3T-01-0001"].items():
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert check_slice_geometry(ds, header, k)[0], check_slice_geometry(ds, header, k)[1]
        for wrong in (k - 1, k + 1):
            ok, message = check_slice_geometry(ds, header, wrong)
            assert not ok and f"slice {wrong}" in message


def test_geometry_check_rejects_transposed_flipped_and_resized(tcia):
    g = tcia["g1"]
    ds = pydicom.dcmread(tcia["files"]["Prostate3T-01-0001"][3], stop_before_pixels=True)
    header = nrrd_header(g)
    d = header["space directions"]
    transposed = dict(header, **{"space directions": d[[1, 0, 2]]})
    flipped = dict(header, **{"space directions": d * np.array([[-1], [1], [1]]),
                              "space origin": header["space origin"] + (g["cols"] - 1) * d[0]})
    resized = dict(header, sizes=np.array([g["rows"], g["cols"], g["n"]]))
    assert not check_slice_geometry(ds, transposed, 3)[0]
    assert "not parallel" in check_slice_geometry(ds, flipped, 3)[1]
    assert "rows x columns" in check_slice_geometry(ds, resized, 3)[1]
    ras = dict(header, space="right-anterior-superior", **{"space directions": d * np.array([-1, -1, 1]),
                                                            "space origin": header["space origin"] * [-1, -1, 1]})
    assert check_slice_geometry(ds, ras, 3)[0]


# ---------------------------------------------------------------- real data

@pytest.fixture(scope="module")
def real_masks(nci_isbi_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("nci_real")
    return out, prepare_nci_isbi(nci_isbi_dir / "labels", out, masks_only=True)


@pytest.mark.slow
def test_real_labels_give_805_slices_and_the_789_of_the_gaze_csv(real_masks, gazemedseg_dir):
    out, result = real_masks
    assert len(result["train"]) == len(set(result["train"])) == 805 and result["test"] == []
    sizes = {}
    with open(gazemedseg_dir / "nci-isbi_fixation.csv", newline="") as f:
        for row in csv.DictReader(f):
            sizes[row["IMAGE"][: -len(".jpg")]] = (float(row["IMAGE_HEIGHT"]), float(row["IMAGE_WIDTH"]))
    kept = {s for s in result["train"] if not s.startswith("ProstateDx-01-0055_")}
    assert len(kept) == 789 and kept == set(sizes)
    for sid in kept:
        with Image.open(out / "masks" / f"{sid}.png") as im:
            assert (im.height, im.width) == sizes[sid], sid


def test_real_dicom_samples_pair_with_their_masks_and_load(real_masks, nci_isbi_dir, tmp_path):
    """The two real slices: InstanceNumber k, geometry of slice k only, and the prostate dataset's tensors."""
    from datasets.segmentation import SegmentationDataset

    out, _ = real_masks
    ids = ["Prostate3T-01-0001_13", "Prostate3T-01-0002_16"]
    for sid in ids:
        case, k = sid.rsplit("_", 1)
        k = int(k)
        path = nci_isbi_dir / "dicom-samples" / f"{sid}.dcm"
        image, mask = read_dicom(path), read_gray(out / "masks" / f"{sid}.png")
        assert image.shape == mask.shape == (320, 320) and mask.any()
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert int(ds.InstanceNumber) == k
        header = nrrd.read_header(str(nci_isbi_dir / "labels" / "nrrd3T" / f"{case}.nrrd"))
        ok, message = check_slice_geometry(ds, header, k)
        assert ok, message
        for wrong in (k - 1, k + 1):
            assert not check_slice_geometry(ds, header, wrong)[0]

    for sub in ("images", "masks"):
        (tmp_path / sub).mkdir()
    for sid in ids:  # a prepared root with just these two slices (in tmp, never in the repo)
        (tmp_path / "images" / f"{sid}.dcm").symlink_to(nci_isbi_dir / "dicom-samples" / f"{sid}.dcm")
        (tmp_path / "masks" / f"{sid}.png").symlink_to(out / "masks" / f"{sid}.png")
    dataset = SegmentationDataset(tmp_path, "prostate", ids, train=False, spatial_size=64)
    for i, sid in enumerate(ids):
        item = dataset[i]
        case, k = sid.rsplit("_", 1)
        label, _ = nrrd.read(str(nci_isbi_dir / "labels" / "nrrd3T" / f"{case}.nrrd"))
        assert item["id"] == sid and item["image"].shape == (1, 64, 64)
        np.testing.assert_array_equal(item["mask"][0].numpy() * 255, expected_mask(label, int(k)))


def test_truncated_dicom_fails_at_prepare_time(tcia, tmp_path, capsys):
    """Every DICOM slice that will be used is decoded: a file cut short fails here, naming it (not in training)."""
    case = "ProstateDx-01-0002"
    labels, dicom = tmp_path / "labels", tmp_path / "dicom"
    labels.mkdir()
    shutil.copy(next(tcia["labels"].rglob(f"{case}*.nrrd")), labels)
    shutil.copytree(tcia["dicom"] / case, dicom / case)
    broken = dicom / case / tcia["files"][case][2].relative_to(tcia["dicom"] / case)  # slice 2 is labelled
    broken.write_bytes(broken.read_bytes()[:-10])
    args = ["nci-isbi", "--labels", str(labels), "--dicom", str(dicom), "--out", str(tmp_path / "out")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: cannot read DICOM {broken}")
    assert not (tmp_path / "out" / "train.txt").exists()
