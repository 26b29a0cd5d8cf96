"""The shared parser (common.errors.OneLineParser, used by every command): both flag spellings, a suggestion for
a mistyped flag, --version, and --config taking a preset's name."""
import pytest

from common.errors import UserError
from common.version import __version__
from engine.predict import build_parser as predict_parser
from experiments.summarize import build_parser as summarize_parser
from experiments.sweep import build_parser as sweep_parser
from gaze.__main__ import parser as gaze_parser
from parse_args import FlagError, build_parser, parse_with_explicit
from prepare.cli import _parser as prepare_parser
from release.export import build_parser as export_parser
from release.onnx_predict import build_parser as onnx_predict_parser


def test_run_py_takes_both_spellings():
    underscores, _ = parse_with_explicit(["--max_ite", "7", "--spatial_size=48", "--exp_path", "E"])
    dashes, explicit = parse_with_explicit(["--max-ite", "7", "--spatial-size=48", "--exp-path", "E"])
    assert vars(dashes) == vars(underscores)
    assert (dashes.max_ite, dashes.spatial_size, dashes.exp_path) == (7, 48, "E")
    assert explicit["max_ite"] == 7


def test_every_command_takes_both_spellings():
    kvasir = ["kvasir", "--src", "S", "--out", "O"]
    assert prepare_parser().parse_args(kvasir + ["--split_dir", "D"]).split_dir == "D"  # declared --split-dir
    assert prepare_parser().parse_args(kvasir + ["--test_size", "3"]).test_size == 3
    gaze = gaze_parser().parse_args(["--csv", "c", "--root", "r", "--data", "d", "--crf_backend", "torch",
                                     "--no_report"])
    assert gaze.crf_backend == "torch" and gaze.no_report
    assert predict_parser().parse_args(["--ckpt-path", "R", "--input", "I", "--out", "O"]).ckpt_path == "R"
    assert sweep_parser().parse_args(["--presets", "p", "--exp-path", "E"]).exp_path == "E"


def test_help_shows_one_spelling():
    text = build_parser().format_help()
    assert "--max_ite" in text and "--max-ite" not in text


def test_mistyped_flag_names_the_close_one():
    expected = r"unrecognized arguments: --max_iter 5 \(--max_iter: did you mean --max_ite\?\)"
    with pytest.raises(FlagError, match=expected):
        parse_with_explicit(["--max_iter", "5"])
    with pytest.raises(UserError, match=r"--seedz: did you mean --seeds\?"):
        sweep_parser().parse_args(["--presets", "p", "--seedz", "1"])
    # a subcommand's flag, mistyped so that argparse first complains about the missing required one
    with pytest.raises(UserError, match=r"--split_dirr: did you mean --split-dir\?"):
        prepare_parser().parse_args(["kvasir", "--src", "S", "--out", "O", "--split_dirr", "D"])


def test_unrelated_flag_gets_no_suggestion():
    with pytest.raises(FlagError) as e:
        parse_with_explicit(["--zzzqqq", "1"])
    assert "did you mean" not in str(e.value)


@pytest.mark.parametrize("make, argv", [
    (build_parser, []), (predict_parser, []), (sweep_parser, []), (summarize_parser, []), (gaze_parser, []),
    (prepare_parser, []), (prepare_parser, ["kvasir"]), (export_parser, []), (onnx_predict_parser, []),
])
def test_version_on_every_command(make, argv, capsys):
    with pytest.raises(SystemExit) as stop:
        make().parse_args(argv + ["--version"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert f"gazesup {__version__}" in out and "commit " in out


def test_config_takes_a_preset_name():
    by_name, explicit = parse_with_explicit(["--config", "kvasir_gazesup"])
    by_path, _ = parse_with_explicit(["--config", "configs/presets/kvasir_gazesup.yaml"])
    assert by_name.run_name == "kvasir_gazesup" and by_name.spatial_size == 224 and by_name.opt == "sgd"
    assert {k: v for k, v in vars(by_name).items() if k != "config"} == \
        {k: v for k, v in vars(by_path).items() if k != "config"}
    assert by_name.config.endswith("configs/presets/kvasir_gazesup.yaml")


def test_config_unknown_name_is_one_error_with_a_suggestion():
    with pytest.raises(FlagError, match=r"--config kvasir_gazesupp: no such file.*did you mean kvasir_gazesup\?"):
        parse_with_explicit(["--config", "kvasir_gazesupp"])
    with pytest.raises(FlagError, match="file not found"):  # a path stays a path
        parse_with_explicit(["--config", "no/such/file.yaml"])
