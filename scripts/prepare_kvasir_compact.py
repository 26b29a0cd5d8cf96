"""Build the compact Kvasir copy a short GPU session needs: training images with their gaze maps and test
images with their masks (the real files, copied: links would not travel), plus train.txt/test.txt.

    python scripts/prepare_kvasir_compact.py --kvasir ../shared/data/kvasir-seg --gaze GAZE_DIR --out .data/kvasir

GAZE_DIR holds crf_compat1/<id>.jpg made by `python -m gaze` from kvasir_fixation.csv. Nothing here may be
committed: .data/ is git-ignored.
"""
import argparse
import shutil
from pathlib import Path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kvasir", required=True, help="Kvasir-SEG folder with images/, masks/, splits/")
    p.add_argument("--gaze", required=True, help="folder with crf_compat1/ gaze maps")
    p.add_argument("--out", required=True, help="output root")
    p.add_argument("--gaze_dir", default="crf_compat1")
    args = p.parse_args(argv)
    src, out = Path(args.kvasir), Path(args.out)
    train = (src / "splits" / "train.txt").read_text().split()
    test = (src / "splits" / "val.txt").read_text().split()
    for sub in ("images", "masks", f"gaze/{args.gaze_dir}"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    for i in train + test:
        shutil.copyfile(src / "images" / f"{i}.jpg", out / "images" / f"{i}.jpg")
    for i in test:
        shutil.copyfile(src / "masks" / f"{i}.jpg", out / "masks" / f"{i}.jpg")
    for i in train:
        shutil.copyfile(Path(args.gaze) / args.gaze_dir / f"{i}.jpg", out / "gaze" / args.gaze_dir / f"{i}.jpg")
    (out / "train.txt").write_text("\n".join(train) + "\n")
    (out / "test.txt").write_text("\n".join(test) + "\n")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"{out}: {len(train)} train, {len(test)} test, {size / 2 ** 20:.1f} MiB")


if __name__ == "__main__":
    main()
