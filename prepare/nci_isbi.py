"""NCI-ISBI 2013 prostate -> ROOT/images/<case>_<k>.dcm, ROOT/masks/<case>_<k>.png, ROOT/train.txt, ROOT/test.txt.

Inputs are the challenge's NRRD label volumes (0 background, 1 central gland, 2 peripheral zone) and
the TCIA DICOM download (any folder nesting and file names). Slice k (1-based) of case C is kept when
label[:, :, k-1] has a voxel >= 1; its mask is label[:, :, k-1].T >= 1 (NRRD axis 0 runs along the
DICOM rows, so it becomes the image's x) and its image is the DICOM file with InstanceNumber k.

Matching DICOM files to cases: by the DICOM PatientID, which TCIA sets to the case name (e.g.
"Prostate3T-01-0001"); when the PatientID is not a case name (e.g. blanked by re-anonymisation), by
the nearest enclosing folder whose name is a case name (TCIA's `<collection>/<case>/<study>/<series>/`
layout). Files of a case are grouped into series by SeriesInstanceUID.
"""
import random
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from datasets.io import DataError, decoded_size
from prepare.util import make_out_dir, write_list

ANGLE_TOL = 1e-3   # 1 - cos(angle) between NRRD and DICOM axes: about 2.6 degrees
POS_TOL = 1e-2     # voxels of slack on the half-voxel bound, for the rounding of DICOM decimal strings
SPACING_TOL = 1e-2  # relative


# ---------------------------------------------------------------- labels

def case_name(path: Path) -> str:
    """Case id of a label file: its name up to the first "_" or ".nrrd". TCIA case names have no "_", and
    the challenge's files add suffixes such as "ProstateDx-01-0006_correctedLabels.nrrd" or "_truth"."""
    return path.name[: -len(".nrrd")].split("_")[0]


def find_label_volumes(dirs) -> dict:
    """{case: path} of every *.nrrd under the given folders (searched recursively)."""
    found = {}
    for d in map(Path, dirs):
        if not d.is_dir():
            raise DataError(f"label folder not found: {d}")
        for p in sorted(d.rglob("*.nrrd")):
            case = case_name(p)
            if case in found:
                raise DataError(f"two label volumes for case {case}: {found[case]} and {p}")
            found[case] = p
    return found


def read_label(path: Path) -> tuple:
    """(volume (X, Y, Z) integer array, NRRD header) of a label file."""
    import nrrd  # only needed for prostate data

    try:
        volume, header = nrrd.read(str(path))
    except Exception as e:
        raise DataError(f"cannot read NRRD {path}: {e}") from e
    if volume.ndim != 3:
        raise DataError(f"{path}: expected a 3-D label volume, got shape {volume.shape}")
    return volume, header


def nonempty_slices(volume: np.ndarray) -> list:
    """1-based indices k of the slices volume[:, :, k-1] with any voxel >= 1."""
    return [int(k) + 1 for k in np.flatnonzero((volume >= 1).any(axis=(0, 1)))]


def slice_mask(volume: np.ndarray, k: int) -> np.ndarray:
    """Binary uint8 mask (H, W) of slice k: 255 where label[:, :, k-1].T >= 1, else 0."""
    return np.where(volume[:, :, k - 1].T >= 1, 255, 0).astype(np.uint8)


# ---------------------------------------------------------------- geometry

def _lps(header) -> tuple:
    """(space directions (3, 3) with one row per NRRD axis, space origin (3,)) in DICOM's LPS patient space."""
    space = header.get("space", "")
    if "space directions" not in header or "space origin" not in header:
        raise DataError("NRRD header has no 'space directions' / 'space origin'")
    directions = np.asarray(header["space directions"], dtype=float)
    origin = np.asarray(header["space origin"], dtype=float)
    if directions.shape != (3, 3) or not np.isfinite(directions).all():
        raise DataError(f"NRRD 'space directions' is not a 3x3 spatial matrix: {directions.tolist()}")
    if space in ("right-anterior-superior", "RAS"):
        flip = np.array([-1.0, -1.0, 1.0])
        return directions * flip, origin * flip
    if space not in ("left-posterior-superior", "LPS"):
        raise DataError(f"NRRD space '{space}' is not supported (expected left-posterior-superior)")
    return directions, origin


def check_slice_geometry(ds, header, k: int) -> tuple:
    """Does DICOM slice DS sit where slice k (1-based) of the NRRD volume is? Returns (ok, message).

    Checks: the DICOM's Rows x Columns equals the NRRD's sizes[1] x sizes[0]; the NRRD's first/second
    space directions are parallel (same sense) to the DICOM's row/column directions
    (ImageOrientationPatient[:3] / [3:]) with lengths equal to PixelSpacing[1] / [0]; and
    ImagePositionPatient lies within half a voxel, per NRRD axis, of origin + (k-1) x third direction.
    The challenge's label files put the origin at the corner of the first voxel, so the DICOM centre is
    exactly half a voxel away on every axis, which is also how far slice k+-1 would be on the slice axis.
    So the slice-axis offset must also agree with the in-plane offsets (same origin convention on all
    axes); that is what tells slice k from its neighbours.

    Args:
        ds: a pydicom Dataset (pixels not needed).
        header: the NRRD header (pynrrd dict).
        k: 1-based slice index into the NRRD volume.
    """
    try:
        directions, origin = _lps(header)
        iop = np.asarray(ds.ImageOrientationPatient, dtype=float)
        ipp = np.asarray(ds.ImagePositionPatient, dtype=float)
        row_spacing, col_spacing = (float(v) for v in ds.PixelSpacing)
        rows, cols = int(ds.Rows), int(ds.Columns)
    except (AttributeError, TypeError, ValueError, DataError) as e:
        return False, f"cannot check geometry: {e}"
    problems = []
    sizes = [int(s) for s in header["sizes"]]
    if (rows, cols) != (sizes[1], sizes[0]):
        problems.append(f"DICOM is {rows}x{cols} (rows x columns), NRRD slice .T is {sizes[1]}x{sizes[0]}")
    steps = np.linalg.norm(directions, axis=1)
    cos_row = float(directions[0] @ iop[:3] / (steps[0] * np.linalg.norm(iop[:3])))
    cos_col = float(directions[1] @ iop[3:] / (steps[1] * np.linalg.norm(iop[3:])))
    if cos_row < 1 - ANGLE_TOL or cos_col < 1 - ANGLE_TOL:
        problems.append(f"NRRD axes 0/1 not parallel to the DICOM row/column directions "
                        f"(cosines {cos_row:.4f}, {cos_col:.4f})")
    if not np.allclose(steps[:2], [col_spacing, row_spacing], rtol=SPACING_TOL):
        problems.append(f"NRRD in-plane steps {steps[0]:.4f}, {steps[1]:.4f} mm != DICOM PixelSpacing "
                        f"(column {col_spacing:.4f}, row {row_spacing:.4f})")
    # continuous NRRD voxel index of the DICOM position, minus the index of slice k's first voxel
    offset = np.linalg.solve(directions.T, ipp - origin) - np.array([0.0, 0.0, k - 1])
    if np.abs(offset).max() > 0.5 + POS_TOL:
        problems.append(f"ImagePositionPatient is not within half a voxel of slice {k}")
    elif abs(offset[2] - offset[:2].mean()) > 0.25:
        problems.append(f"slice-axis offset disagrees with the in-plane offsets: a neighbour of slice {k}")
    where = f"voxel offset ({offset[0]:+.3f}, {offset[1]:+.3f}, {offset[2]:+.3f})"
    if problems:
        return False, f"slice {k}: " + "; ".join(problems) + f" [{where}]"
    return True, f"slice {k}: ok [{where}, cosines {cos_row:.4f}, {cos_col:.4f}]"


# ---------------------------------------------------------------- DICOM tree

def scan_dicom_tree(root, cases) -> tuple:
    """Group the DICOM files under ROOT by case and series.

    Args:
        root: top folder of the TCIA download (any nesting, any file names).
        cases: the case names to look for.
    Returns:
        ({case: {series_uid: [(path, dataset without pixels), ...]}}, number of unreadable files).
    """
    import pydicom  # only needed for prostate data

    root, cases = Path(root), set(cases)
    if not root.is_dir():
        raise DataError(f"DICOM folder not found: {root}")
    found, unreadable = {}, 0
    for path in sorted(root.rglob("*")):
        if not path.is_file() or path.name.startswith("."):
            continue
        try:
            ds = pydicom.dcmread(str(path), stop_before_pixels=True)
        except Exception:  # not DICOM (metadata.csv, licences...) or corrupt
            unreadable += 1
            continue
        if "InstanceNumber" not in ds or "ImagePositionPatient" not in ds:
            continue  # not an image slice (DICOMDIR, structured report...)
        case = str(ds.get("PatientID", ""))
        if case not in cases:
            case = next((p.name for p in path.relative_to(root).parents if p.name in cases), None)
        if case is None:
            continue  # a case without labels
        series = str(ds.get("SeriesInstanceUID", "")) or str(path.parent)
        found.setdefault(case, {}).setdefault(series, []).append((path, ds))
    return found, unreadable


def _series_by_instance(files: list, n: int) -> tuple:
    """({k: (path, ds)} for k = 1..n, or None, reason) for one series."""
    by_k = {}
    for path, ds in files:
        try:
            k = int(ds.InstanceNumber)
        except (TypeError, ValueError):
            return None, f"{path}: InstanceNumber {ds.InstanceNumber!r} is not an integer"
        if k in by_k:
            return None, f"InstanceNumber {k} appears twice ({by_k[k][0]} and {path})"
        by_k[k] = (path, ds)
    if sorted(by_k) != list(range(1, n + 1)):
        return None, f"InstanceNumbers are {min(by_k)}..{max(by_k)}, expected 1..{n}"
    return by_k, ""


def pick_series(header, n: int, series: dict, ignore_geometry: bool = False) -> tuple:
    """The one DICOM series that pairs with an n-slice label volume: ({k: (path, ds)} or None, reasons).

    A series qualifies if it has n slices with InstanceNumbers 1..n and every slice passes
    check_slice_geometry (failures are listed in the reasons; with IGNORE_GEOMETRY they do not disqualify).
    """
    if not series:
        return None, ["no DICOM series found"]
    counts = sorted(len(files) for files in series.values())
    if n not in counts:
        return None, [f"slice count mismatch: label volume has {n} slices, DICOM series has {counts}"]
    good, reasons = [], []
    for uid, files in series.items():
        if len(files) != n:
            continue
        by_k, reason = _series_by_instance(files, n)
        if by_k is None:
            reasons.append(f"series {uid}: {reason}")
            continue
        checks = [check_slice_geometry(ds, header, k) for k, (_, ds) in sorted(by_k.items())]
        bad = [msg for ok, msg in checks if not ok]
        reasons += [f"series {uid}: geometry mismatch, {msg}" for msg in bad]
        if not bad or ignore_geometry:
            good.append(by_k)
    if len(good) > 1:
        return None, reasons + [f"{len(good)} DICOM series of {n} slices fit; cannot choose"]
    return (good[0] if good else None), reasons


# ---------------------------------------------------------------- prepare

def prepare_nci_isbi(labels, out, dicom=None, test_labels=(), masks_only: bool = False, exclude=(),
                     seed: int = 0, ignore_geometry: bool = False) -> dict:
    """Write masks (and DICOM slices) of every non-empty label slice, and the train/test slice lists.

    Args:
        labels: folder(s) with the training cases' NRRD label volumes (searched recursively).
        out: the prepared root to write.
        dicom: top folder of the TCIA DICOM download; required unless MASKS_ONLY.
        test_labels: folder(s) with the test cases' label volumes (e.g. the challenge's Leaderboard and
            Test labels); their slices go to test.txt.
        masks_only: write only masks and lists (no DICOMs needed; no slice-count or geometry check).
        exclude: case names to leave out.
        seed: seed of the shuffle of train.txt (test.txt keeps case/slice order).
        ignore_geometry: keep cases whose slices fail the geometry check (still reported).
    Returns:
        {"train": [ids], "test": [ids], "skipped": {case: reason}, "kept_despite": {case: [reasons]} (cases
         kept with IGNORE_GEOMETRY although their slices failed a check), "geometry": [mismatch messages],
         "unreadable": number of non-DICOM/unreadable files under DICOM}. Nothing is printed: the caller
         reports each skipped case once.
    """
    if isinstance(labels, (str, Path)):
        labels = [labels]
    if isinstance(test_labels, (str, Path)):
        test_labels = [test_labels]
    if masks_only == (dicom is not None):
        raise DataError("give --dicom TCIA_DIR, or --masks-only to write only the masks and lists")
    train_cases, test_cases = find_label_volumes(labels), find_label_volumes(test_labels)
    if not train_cases:
        raise DataError(f"no .nrrd label volumes under {', '.join(map(str, labels))}")
    both = sorted(train_cases.keys() & test_cases.keys())
    if both:
        raise DataError(f"case {both[0]} has labels in both the training ({train_cases[both[0]]}) "
                        f"and test ({test_cases[both[0]]}) folders")
    cases = {**train_cases, **test_cases}
    unknown = sorted(set(exclude) - cases.keys())
    if unknown:
        raise DataError(f"--exclude {unknown[0]}: no label volume for this case")

    out = make_out_dir(out, check_only=True)
    if not masks_only:
        dicoms, unreadable = scan_dicom_tree(dicom, cases)
    make_out_dir(out / "masks")
    if not masks_only:
        make_out_dir(out / "images")
    result = {"train": [], "test": [], "skipped": {}, "kept_despite": {}, "geometry": [],
              "unreadable": 0 if masks_only else unreadable}
    for case in sorted(cases):
        if case in exclude:
            continue
        volume, header = read_label(cases[case])
        if not masks_only:
            by_k, reasons = pick_series(header, volume.shape[2], dicoms.get(case, {}), ignore_geometry)
            result["geometry"] += [f"{case}: {r}" for r in reasons if "geometry mismatch" in r]
            if by_k is None:
                more = f" (+{len(reasons) - 1} more)" if len(reasons) > 1 else ""
                result["skipped"][case] = reasons[0] + more
                continue
            if reasons:
                result["kept_despite"][case] = reasons
        split = "test" if case in test_cases else "train"
        if not masks_only:  # decode every slice that will be used: a truncated file fails here, naming it
            for k in nonempty_slices(volume):
                decoded_size(by_k[k][0])
        for k in nonempty_slices(volume):
            sid = f"{case}_{k}"
            Image.fromarray(slice_mask(volume, k)).save(out / "masks" / f"{sid}.png")
            if not masks_only:
                shutil.copyfile(by_k[k][0], out / "images" / f"{sid}.dcm")
            result[split].append(sid)
    random.Random(seed).shuffle(result["train"])
    write_list(out / "train.txt", result["train"])
    write_list(out / "test.txt", result["test"])
    return result
