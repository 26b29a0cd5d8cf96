"""configs/: the paper's recipe written once (configs/recipes/paper.yaml), the two paper configs and every preset
as deltas on it; every preset parses as run.py flags, and the docs' table of presets (docs/reference/presets.md)
says what the files say."""
from pathlib import Path

import pytest
import yaml

from common.dataspec import load_spec
from common.recipes import read_recipe
from parse_args import parse_args

REPO = Path(__file__).resolve().parents[2]
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
    paper = read_recipe(REPO / "configs" / f"{args.data}_gaze_sup_2_levels.yaml")
    assert {k: getattr(args, k) for k in RECIPE} == {k: paper[k] for k in RECIPE}
    if args.method == "gaze_sup":  # every level has a threshold (the spec's table or the preset's own)
        assert len(load_spec(args.data).level_thresholds(args.num_levels, args.thresholds)) == args.num_levels
    if path.stem.endswith("_gazesup"):  # as published: the paper's run, only named
        assert {k: getattr(args, k) for k in paper} == paper
        assert args.gaze_dir == "crf_compat1" and args.thresholds is None


def base_chain(path: Path) -> list[Path]:
    chain = [path]
    while "base" in (values := yaml.safe_load(chain[-1].read_text())):
        chain.append((chain[-1].parent / values["base"]).resolve())
    return chain


PAPER_CONFIGS = [REPO / "configs" / f"{d}_gaze_sup_2_levels.yaml" for d in ("kvasir", "prostate")]


@pytest.mark.parametrize("path", PRESETS + PAPER_CONFIGS, ids=lambda p: p.stem)
def test_recipe_is_written_once(path):
    """Each file's chain ends at configs/recipes/paper.yaml and restates none of the values it inherits, so a
    change to the recipe is a change to one file."""
    chain = base_chain(path)
    assert chain[-1] == (REPO / "configs" / "recipes" / "paper.yaml").resolve()
    own = yaml.safe_load(path.read_text())
    inherited = read_recipe(chain[1])
    restated = {k: v for k, v in own.items() if k != "base" and inherited.get(k) == v}
    assert not restated, f"{path.name} restates inherited values {restated}"


def test_a_recipe_change_reaches_every_preset(tmp_path):
    """A copy of configs/ with one recipe value changed: every preset resolves to the new value."""
    import shutil
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    recipe = tmp_path / "configs" / "recipes" / "paper.yaml"
    recipe.write_text(recipe.read_text().replace("lr: 0.01", "lr: 0.02"))
    for path in sorted((tmp_path / "configs" / "presets").glob("*.yaml")):
        assert read_recipe(path)["lr"] == 0.02, path.name


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
        v = read_recipe(path)
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
