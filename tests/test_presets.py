"""configs/presets/: every preset parses as run.py flags, keeps the paper's recipe, and the docs' table
of presets (docs/reference/presets.md) says what the files say."""
from pathlib import Path

import pytest
import yaml

from common.dataspec import load_spec
from parse_args import parse_args

REPO = Path(__file__).resolve().parents[1]
PRESETS = sorted((REPO / "configs" / "presets").glob("*.yaml"))
RECIPE = ["model", "batch_size", "spatial_size", "in_channels", "opt", "lr", "lr_min", "lr_scheduler", "max_ite",
          "data_size_rate"]


def test_the_expected_rows_exist():
    names = {p.stem for p in PRESETS}
    rows = ["gazesup", "gazesup_1level", "gazesup_3levels", "gazesup_pure", "gazesup_nocons", "gazesup_heatmap",
            "full_sup", "heatmap_1level"]
    assert names == {f"{d}_{r}" for d in ("kvasir", "prostate") for r in rows} | {"kvasir_box", "kvasir_box_crf"}


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_preset_parses_with_the_papers_recipe(path):
    args = parse_args(["--config", str(path), "--root", "X"])
    values = yaml.safe_load(path.read_text())
    assert args.run_name == path.stem == values["run_name"]
    paper = yaml.safe_load((REPO / "configs" / f"{args.data}_gaze_sup_2_levels.yaml").read_text())
    assert {k: getattr(args, k) for k in RECIPE} == {k: paper[k] for k in RECIPE}
    if args.method == "gaze_sup":  # every level has a threshold (the spec's table or the preset's own)
        assert len(load_spec(args.data).level_thresholds(args.num_levels, args.thresholds)) == args.num_levels
    if path.stem.endswith("_gazesup"):  # as published: the paper's run, only named
        assert {k: getattr(args, k) for k in paper} == paper
        assert args.gaze_dir == "crf_compat1" and args.thresholds is None


def readme_rows() -> dict:
    rows = {}
    for line in (REPO / "docs" / "reference" / "presets.md").read_text().splitlines():
        if line.startswith("| ") and "configs/presets/" in line:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows[cells[0]] = cells
    return rows


def test_readme_table_matches_the_files():
    """docs/reference/presets.md:
    | preset | data | pseudo-masks | levels (thresholds) | consistency | what it is | command |"""
    rows = readme_rows()
    assert set(rows) == {p.stem for p in PRESETS}
    for path in PRESETS:
        name, data, masks, levels, cons, _, cmd = rows[path.stem]
        v = yaml.safe_load(path.read_text())
        assert data == v["data"], name
        assert f"--config configs/presets/{path.name} " in cmd, name
        if v["method"] == "full_sup":
            assert (masks, levels, cons) == ("GT masks", "-", "-"), name
            continue
        assert masks == f"`gaze/{v.get('gaze_dir', 'crf_compat1')}`", name
        n = v["num_levels"]
        thresholds = v.get("thresholds") or load_spec(v["data"]).thresholds[n]
        assert levels == f"{n} ({', '.join(f'{t:g}' for t in thresholds)})", name
        consistency = "weight 0" if v["cons_weight"] == 0 else f"{v['cons_mode']}, {v['cons_weight']:g}"
        expected = "-" if n == 1 else consistency
        assert cons == expected, name
