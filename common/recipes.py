"""Recipes: YAML files of run.py flag values, written as deltas. A file may name another with `base: FILE`
(relative to its own folder); its keys are applied over the base's, so the paper's recipe is written once
(configs/recipes/paper.yaml) and each preset states only what it changes."""
from pathlib import Path
from typing import Any

import yaml

from common.errors import UserError

BASE_KEY = "base"


class RecipeError(UserError):
    """A recipe file that cannot be read: missing, not YAML, not a mapping, or a bad `base:` chain."""


def _read_mapping(path: Path, what: str) -> dict[str, Any]:
    if path.is_dir():
        raise RecipeError(f"{what} {path} is a folder; expected a YAML file (e.g. RUN/config.yaml)")
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise RecipeError(f"{what} {path}: file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError(f"{what} {path}: cannot read it ({e})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise RecipeError(f"{what} {path}: invalid YAML{where}: {problem}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise RecipeError(f"{what} {path}: expected a mapping of flag names to values, got {type(raw).__name__}")
    return raw


def read_recipe(path, what: str = "--config") -> dict[str, Any]:
    """The flag values of the recipe at `path` with its `base:` chain resolved (the base's keys first, each
    file's own keys over them; `base` itself is not a flag and is dropped).

    Args:
        path: the YAML file.
        what: how errors name the file (the flag or role it came from).
    Raises:
        RecipeError: naming the file (and the chain) and what was expected.
    """
    chain: list[Path] = []
    layers = []
    current = Path(path)
    while True:
        key = current.resolve()
        if key in chain:
            raise RecipeError(f"{what} {path}: `base:` chain loops back to {current}")
        chain.append(key)
        values = _read_mapping(current, what if len(chain) == 1 else f"{what} {path}: base")
        layers.append(values)
        base = values.get(BASE_KEY)
        if base is None:
            break
        if not isinstance(base, str) or not base:
            raise RecipeError(f"{what} {current}: base is {base!r}; expected the path of another recipe file")
        current = current.parent / base
    resolved: dict[str, Any] = {}
    for values in reversed(layers):
        resolved.update({k: v for k, v in values.items() if k != BASE_KEY})
    return resolved


CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
NAMED_DIRS = (CONFIG_DIR / "presets", CONFIG_DIR, CONFIG_DIR / "recipes")  # looked up in this order


def recipe_names() -> list[str]:
    """The names --config accepts instead of a path: the shipped presets, configs and recipes."""
    return sorted({p.stem for d in NAMED_DIRS for p in d.glob("*.yaml")})


def config_path(text: str, what: str = "--config") -> Path:
    """The file of --config TEXT: TEXT itself when it is a path (an existing file, or a name with a folder or a
    .yaml/.yml suffix), else the shipped preset/config/recipe of that name (as `run.py sweep --presets`)."""
    path = Path(text)
    if path.exists() or path.suffix in (".yaml", ".yml") or len(path.parts) > 1:
        return path
    for folder in NAMED_DIRS:
        if (folder / f"{text}.yaml").is_file():
            return folder / f"{text}.yaml"
    import difflib
    close = difflib.get_close_matches(text, recipe_names(), n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    from common.version import install_problem
    raise RecipeError(f"{what} {text}: no such file, and no preset or config of that name ({hint}names: "
                      f"{', '.join(recipe_names())}){install_problem()}")
