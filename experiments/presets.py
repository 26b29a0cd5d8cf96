"""Presets: the paper's runs, ablations and baselines as YAML files under configs/presets/ (keys = run.py flag
names, `run_name` = the file's name), each a delta on the paper's recipe through `base:` (common/recipes.py).
`python -m experiments.presets` prints the table of them in docs/reference/presets.md."""
import fnmatch
from pathlib import Path

from common.errors import UserError
from common.recipes import RecipeError, read_recipe

PRESET_DIR = Path(__file__).resolve().parents[1] / "configs" / "presets"


class PresetError(UserError):
    """A preset name, pattern or file that cannot be used."""


def list_presets() -> list[str]:
    """The shipped presets' names, sorted."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def resolve_presets(items: list[str]) -> list[Path]:
    """Preset files from names (`kvasir_gazesup`), shell patterns of names (`kvasir_*`) or YAML paths.

    Args:
        items: as given on the command line; order is kept, duplicates dropped.
    Returns:
        existing YAML files.
    """
    paths: list[Path] = []
    for item in items:
        path = Path(item)
        if path.suffix in (".yaml", ".yml") or path.is_file():
            if not path.is_file():
                raise PresetError(f"preset file not found: {item}")
            found = [path]
        else:
            found = [PRESET_DIR / f"{n}.yaml" for n in list_presets() if fnmatch.fnmatchcase(n, item)]
            if not found:
                raise PresetError(f"no preset named {item!r} in {PRESET_DIR} (have: {', '.join(list_presets())})")
        paths += [p for p in found if p not in paths]
    return paths


def read_preset(path: Path) -> dict:
    """The preset's flag values (its `base:` chain resolved); `run_name` is required: it identifies the preset's
    runs in EXP."""
    try:
        values = read_recipe(path, "preset")
    except RecipeError as e:
        raise PresetError(str(e)) from None
    name = values.get("run_name")
    if not isinstance(name, str) or not name or "/" in name:
        raise PresetError(f"{path}: run_name is {name!r}; expected a folder-safe name (it identifies the runs)")
    return values


def description(path: Path) -> str:
    """The preset's first comment line (what the row is)."""
    for line in Path(path).read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").rstrip(".")
    return ""


def table_row(path: Path) -> list[str]:
    """preset | data | pseudo-masks | levels (thresholds) | consistency | what it is | command."""
    from common.dataspec import load_spec

    v = read_preset(path)
    levels = int(v.get("num_levels", 2))
    if v.get("method", "gaze_sup") in ("full_sup", "full"):
        masks, level_text, cons = "GT masks", "-", "-"
    else:
        masks = f"`gaze/{v.get('gaze_dir', 'crf_compat1')}`"
        thresholds = load_spec(v.get("data", "kvasir")).level_thresholds(levels, v.get("thresholds"))
        level_text = f"{levels} ({', '.join(f'{t:g}' for t in thresholds)})"
        weight = float(v.get("cons_weight", 3.0))
        cons = "-" if levels == 1 else ("weight 0" if weight == 0 else f"{v.get('cons_mode', 'prop')}, {weight:g}")
    rel = f"configs/presets/{Path(path).name}"
    return [v["run_name"], str(v.get("data", "kvasir")), masks, level_text, cons, description(path),
            f"`python run.py --config {rel} --root ROOT --exp_path EXP --seed 0`"]


TABLE_HEADER = ["preset", "data", "pseudo-masks", "levels (thresholds)", "consistency", "what it is", "command"]


def presets_table() -> str:
    """The Markdown table of every shipped preset."""
    rows = [TABLE_HEADER, ["---"] * len(TABLE_HEADER)]
    rows += [table_row(PRESET_DIR / f"{n}.yaml") for n in list_presets()]
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)


if __name__ == "__main__":
    print(presets_table())
