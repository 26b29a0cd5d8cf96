"""common/recipes.py: a recipe file's `base:` chain resolved (base first, each file's keys over it), and a bad
chain refused with one message naming the file."""
import pytest

from common.recipes import RecipeError, read_recipe


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_keys_override_the_base_along_the_chain(tmp_path):
    write(tmp_path / "recipes" / "paper.yaml", "lr: 0.01\nmax_ite: 15000\nnum_levels: 2\n")
    write(tmp_path / "kvasir.yaml", "base: recipes/paper.yaml\ndata: kvasir\n")
    preset = write(tmp_path / "presets" / "one.yaml", "base: ../kvasir.yaml\nrun_name: one\nnum_levels: 1\n")
    assert read_recipe(preset) == {"lr": 0.01, "max_ite": 15000, "num_levels": 1, "data": "kvasir",
                                   "run_name": "one"}


def test_a_file_without_base_is_read_as_it_is(tmp_path):
    assert read_recipe(write(tmp_path / "a.yaml", "lr: 0.5\n")) == {"lr": 0.5}
    assert read_recipe(write(tmp_path / "empty.yaml", "")) == {}


@pytest.mark.parametrize("files, message", [
    ({"a.yaml": "base: missing.yaml\n"}, "missing.yaml: file not found"),
    ({"a.yaml": "base: b.yaml\n", "b.yaml": "base: a.yaml\n"}, "loops back"),
    ({"a.yaml": "base: [x]\n"}, "base is ['x']"),
    ({"a.yaml": "- 1\n"}, "expected a mapping"),
    ({"a.yaml": "lr: [\n"}, "invalid YAML at line"),
])
def test_bad_chains_are_one_error_naming_the_file(tmp_path, files, message):
    for name, text in files.items():
        write(tmp_path / name, text)
    with pytest.raises(RecipeError, match="a.yaml") as e:
        read_recipe(tmp_path / "a.yaml")
    assert message in str(e.value) and "\n" not in str(e.value)
