"""docs/reference/flags.md is what scripts/gen_flag_docs.py writes from the parsers (run it after changing a flag)."""
import importlib.util

from tests.helpers import REPO


def load_generator():
    spec = importlib.util.spec_from_file_location("gen_flag_docs", REPO / "scripts" / "gen_flag_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_flag_reference_is_current():
    gen = load_generator()
    assert gen.OUT.read_text() == gen.render(), "out of date: run python scripts/gen_flag_docs.py"


def test_flag_reference_has_every_flag_of_every_command():
    from parse_args import build_parser
    from prepare.cli import _parser

    text = load_generator().render()
    for action in build_parser()._actions:
        for flag in [f for f in action.option_strings if f not in ("-h", "--help")]:
            assert f"`{flag}" in text, flag
    assert "`--split-dir SPLIT_DIR`" in text and "`--crf-backend {pydensecrf,torch}`" in text
    assert "## `python -m prepare nci-isbi`" in text and _parser() is not None
    assert "--max_ite" in text and "`--max-ite`" in text  # the note on the two spellings
