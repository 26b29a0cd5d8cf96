"""Write docs/reference/flags.md from the parsers: every flag of every command, its default, its roles (run.py)
and its help, so the reference cannot drift from `--help`. tests/test_flag_docs.py fails when the file is not
what this script writes.

    python scripts/gen_flag_docs.py            # rewrite docs/reference/flags.md
    python scripts/gen_flag_docs.py --check    # exit 1 if it is out of date
"""
import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
OUT = REPO / "docs" / "reference" / "flags.md"


def _cell(text) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _default(action: argparse.Action) -> str:
    if action.default is None or action.default is False or action.default == argparse.SUPPRESS \
            or "default" in (action.help or ""):
        return ""  # none, an off switch, or the help says it (e.g. a default that depends on the machine)
    value = action.default
    return f"`{','.join(map(str, value)) if isinstance(value, list) else value}`"


def _names(action: argparse.Action) -> str:
    names = action.option_strings or [action.dest]
    metavar = "" if action.nargs == 0 else f" {action.metavar or action.dest.upper()}"
    if action.choices and action.nargs != 0:
        metavar = " {" + ",".join(map(str, action.choices)) + "}"
    return ", ".join(f"`{n}{metavar if n == names[-1] else ''}`" for n in names)


def _visible(parser: argparse.ArgumentParser) -> list:
    return [a for a in parser._actions if a.help != argparse.SUPPRESS and a.dest not in ("help",)
            and not isinstance(a, argparse._SubParsersAction)]


def run_py_section() -> list[str]:
    import parse_args

    parser = parse_args.build_parser()
    lines = ["## `python run.py` (installed: `gazesup`)", "",
             "Roles (declared once in `parse_args.py`; `--resume`, `--test`, `predict` and `sweep` derive their "
             "rules from them):", ""]
    lines += [f"- `{role}`: {text}" for role, text in parse_args.ROLE_DESCRIPTIONS.items()]
    for group in parser._action_groups:
        actions = [a for a in group._group_actions if a.help != argparse.SUPPRESS and a.dest != "help"]
        if not actions:
            continue
        lines += ["", f"### {group.title}", "", "| flag | default | roles | what it does |", "|---|---|---|---|"]
        for a in actions:
            roles = ", ".join(f"`{r}`" for r in sorted(getattr(a, "roles", ())))
            lines.append(f"| {_names(a)} | {_default(a)} | {roles} | {_cell(a.help or '')} |")
    return lines


def command_section(title: str, parser: argparse.ArgumentParser, note: str = "") -> list[str]:
    lines = ["", f"## `{title}`{note}", "", "| flag | default | what it does |", "|---|---|---|"]
    for a in _visible(parser):
        lines.append(f"| {_names(a)} | {_default(a)} | {_cell(a.help or '')} |")
    return lines


def render() -> str:
    from engine.predict import build_parser as predict
    from experiments.summarize import build_parser as summarize
    from experiments.sweep import build_parser as sweep
    from gaze.__main__ import parser as gaze
    from gaze.simulate import parser as gaze_simulate
    from prepare.cli import _parser as prepare
    from release.export import build_parser as export
    from release.onnx_predict import build_parser as onnx_predict

    lines = ["# Flag reference", "",
             "Generated from the parsers by `python scripts/gen_flag_docs.py`; `--help` on each command prints the "
             "same text. Every command accepts a long flag with underscores or with dashes (`--max_ite` = "
             "`--max-ite`, `--split-dir` = `--split_dir`); the spelling below is the one `--help` shows. A "
             "mistyped flag is an error naming the close one (`--max_iter`: did you mean `--max_ite`?). Every "
             "command has `--version` (the package version and the code's git commit).", ""]
    lines += run_py_section()
    lines += command_section("python run.py predict", predict())
    lines += command_section("python run.py predict --model", onnx_predict(), ": an exported model, onnxruntime")
    lines += command_section("python run.py export", export())
    lines += command_section("python run.py sweep", sweep())
    lines += command_section("python run.py summarize", summarize())
    lines += command_section("python -m gaze", gaze(), " (installed: `gazesup-gaze`)")
    lines += command_section("python -m gaze simulate", gaze_simulate(), " (installed: `gazesup-gaze simulate`)")
    subs = next(a for a in prepare()._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subs.choices.items():
        lines += command_section(f"python -m prepare {name}", sub, f" (installed: `gazesup-prepare {name}`)")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    check = "--check" in (argv if argv is not None else sys.argv[1:])
    text = render()
    if check:
        current = OUT.read_text() if OUT.is_file() else ""
        if current != text:
            print(f"{OUT} is out of date: run python scripts/gen_flag_docs.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
