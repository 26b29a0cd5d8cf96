"""The docs against the code: every command in README.md and docs/ uses flags its command has, and every
relative link leads to a file (and heading) that exists.

Checked commands: the lines of fenced code blocks (```bash, ```sh, ```console or unlabelled) and the inline
code spans that start with `python `, `bash `, `pytest`, `torchrun ` or `pip install` (also after `&&`):
- `python run.py [predict|sweep|summarize] ...`, `python -m gaze ...`, `python -m prepare ...`: every flag
  is one of the parser's own option strings (no abbreviations); a value given to a flag with choices or a
  type is one it accepts, unless it is a placeholder (`EXP`, `<run>`, `...`); a `configs/`, `scripts/` or
  `tests/` path exists. After `--`, a sweep's flags are run.py's.
- any other `python -m MODULE`: the module exists; `python FILE` and `bash FILE`: the file exists, and a
  Python script's source spells each `--flag` given to it; `pytest` and `pip install -r`: the paths exist.
Nothing is run: the parsers are imported and read.
"""
import argparse
import functools
import importlib
import importlib.util
import re
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Where each documented command's parser is built today: command as typed -> "module:function returning an
# argparse parser". The docs keep the names users type; update the right-hand side when code moves.
PARSERS = {
    "python run.py": "parse_args:build_parser",
    "python run.py predict": "engine.predict:build_parser",
    "python run.py predict --model": "release.onnx_predict:build_parser",  # the exported model, onnxruntime
    "python run.py export": "release.export:build_parser",
    "python run.py sweep": "experiments.sweep:build_parser",
    "python run.py summarize": "experiments.summarize:build_parser",
    "python -m gaze": "gaze.__main__:parser",
    "python -m gaze simulate": "gaze.simulate:parser",
    "python -m prepare": "prepare.cli:_parser",
}
# Modules the docs name by a path they are moving to, and where they are today (`python -m NAME` is checked
# as `python -m MODULES.get(NAME, NAME)`).
MODULES: dict = {}
# Files linked from the docs that other branches are writing. Remove an entry when its file is merged:
# test_pending_files_are_still_missing fails as soon as one exists.
PENDING: set[str] = set()

DOCS = [REPO / "README.md"] + sorted((REPO / "docs").rglob("*.md"))
STARTS = ("python ", "bash ", "pytest", "torchrun ", "pip install")
FENCE = re.compile(r"^```(\w*)\s*$")
SHELL_FENCES = {"", "bash", "sh", "shell", "console"}


def rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


# ---------------------------------------------------------------- reading the docs
def split_fences(text: str) -> tuple[list[tuple[int, str, str]], list[tuple[int, str]]]:
    """(fenced lines as (line number, fence label, line), prose lines as (line number, line))."""
    code, prose, label = [], [], None
    for n, line in enumerate(text.splitlines(), start=1):
        fence = FENCE.match(line.strip())
        if fence and label is None:
            label = fence.group(1)
        elif line.strip() == "```" and label is not None:
            label = None
        elif label is not None:
            code.append((n, label, line))
        else:
            prose.append((n, line))
    return code, prose


def commands(path: Path) -> list[tuple[str, str]]:
    """(where, command) for every checked command of one Markdown file; continuation lines joined."""
    code, prose = split_fences(path.read_text())
    found, pending = [], None
    for n, label, line in code:
        if label not in SHELL_FENCES:
            continue
        if pending is not None:
            where, text = pending
            line = text + " " + line.strip()
        else:
            where = f"{rel(path)}:{n}"
        if line.rstrip().endswith("\\"):
            pending = (where, line.rstrip()[:-1])
            continue
        pending = None
        found.append((where, line.strip()))
    for n, line in prose:
        for span in re.findall(r"`([^`]+)`", line):
            found.append((f"{rel(path)}:{n}", span.strip()))
    return [(where, part) for where, line in found for part in segments(line) if part.startswith(STARTS)]


def segments(line: str) -> list[str]:
    """The commands of one shell line, split at `&&`, `||` and `;`, comments dropped."""
    try:
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split, lexer.commenting = True, True
        tokens = list(lexer)
    except ValueError:  # not shell (an unbalanced quote in prose)
        return []
    parts, current = [], []
    for token in tokens + [";"]:
        if token in (";", "&&", "||", "|", "&"):
            if current:
                parts.append(shlex.join(current))
            current = []
        else:
            current.append(token)
    return parts


def all_commands() -> list[tuple[str, str]]:
    return [c for path in DOCS for c in commands(path)]


# ---------------------------------------------------------------- checking one command
@functools.cache
def load(target: str):
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)()


def is_placeholder(token: str) -> bool:
    """EXP, ROOT, RUN, <run>, EXP/0/kvasir/<run>, ...: stands for a value the reader supplies."""
    return token == "..." or "<" in token or bool(re.fullmatch(r"[A-Z][A-Z0-9_]*", token))


def options(parser: argparse.ArgumentParser) -> dict:
    return {s: a for a in parser._actions for s in a.option_strings}


def subparsers(parser: argparse.ArgumentParser) -> dict:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def check_value(flag: str, action: argparse.Action, value: str) -> list[str]:
    if is_placeholder(value):
        return []
    if action.choices is not None and value not in action.choices:
        return [f"{flag} {value}: not one of {sorted(action.choices)}"]
    if action.type is not None and action.choices is None:
        try:
            action.type(value)
        except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
            return [f"{flag} {value}: not accepted ({e})"]
    return []


def check_path(token: str) -> list[str]:
    if token.startswith(("configs/", "scripts/", "tests/")) and not is_placeholder(token):
        if not (REPO / token).exists():
            return [f"{token}: no such file in the repository"]
    return []


def check_args(parser: argparse.ArgumentParser, args: list[str], command: str) -> list[str]:
    """Problems with `args` for `parser` (flags, values of flags, repository paths)."""
    if not args:  # the command named in prose, `python -m gaze`
        return []
    subs = subparsers(parser)
    if subs:
        chosen = next((a for a in args if not a.startswith("-")), None)
        if chosen not in subs:
            return [f"{command}: expects one of {sorted(subs)}, got {chosen}"]
        args = args[args.index(chosen) + 1:]
        parser = subs[chosen]
    known, problems, i = options(parser), [], 0
    while i < len(args):
        token = args[i].strip("[]")
        i += 1
        problems += check_path(token)
        if not token.startswith("-") or token in ("-", "...") or re.fullmatch(r"-\d.*", token):
            continue
        flag, _, inline = token.partition("=")
        action = known.get(flag)
        if action is None:
            problems.append(f"{flag}: no such flag in {command}")
            continue
        if inline:
            problems += check_value(flag, action, inline)
            continue
        takes = 0 if action.nargs == 0 else (None if action.nargs in ("+", "*") else 1)
        while (takes is None or takes > 0) and i < len(args) and not args[i].strip("[]").startswith("-"):
            value = args[i].strip("[]")
            problems += check_value(flag, action, value) + check_path(value)
            i += 1
            takes = None if takes is None else takes - 1
    return problems


def check_command(command: str) -> list[str]:
    """Problems with one documented command; [] when it is consistent with the code."""
    words = shlex.split(command)
    if words[0] == "torchrun":  # torchrun [its flags] run.py ...: run.py's flags are checked
        words = ["python"] + words[next(i for i, w in enumerate(words) if w.endswith(".py")):]
    if words[:3] == ["python", "-m", "pytest"] or words[0] == "pytest":
        args = words[3 if words[0] == "python" else 1:]
        paths = [w for k, w in enumerate(args) if not w.startswith("-") and (k == 0 or args[k - 1] not in
                                                                              ("-m", "-k", "-p", "-o"))]
        return [f"{p}: no such path" for p in paths if not (REPO / p.split("::")[0]).exists()]
    if words[:2] == ["pip", "install"]:
        return [f"{w}: no such file" for k, w in enumerate(words) if words[k - 1] == "-r" and not (REPO / w).exists()]
    if words[0] == "bash":
        return [] if (REPO / words[1]).is_file() else [f"{words[1]}: no such script"]
    if words[:3] == ["python", "run.py", "predict"] and "--model" in words:  # predict's onnxruntime form
        words = words[:3] + ["--model"] + words[3:]
    for key in sorted(PARSERS, key=len, reverse=True):
        n = len(key.split())
        if words[:n] == key.split():
            args, passed = words[n:], []
            if key == "python run.py sweep" and "--" in args:  # flags after `--` go to every run.py
                args, passed = args[:args.index("--")], args[args.index("--") + 1:]
            return check_args(load(PARSERS[key]), args, key) + check_args(load(PARSERS["python run.py"]), passed,
                                                                           "python run.py")
    if words[1] == "-m":
        module = MODULES.get(words[2], words[2])
        return [] if importlib.util.find_spec(module) else [f"python -m {words[2]}: no such module"]
    script = REPO / words[1]
    if not script.is_file():
        return [f"{words[1]}: no such file"]
    source = script.read_text()
    return [f"{w}: {words[1]} has no such flag" for w in words[2:]
            if w.startswith("--") and f'"{w.split("=")[0]}"' not in source]


# ---------------------------------------------------------------- the tests
def test_the_docs_hold_the_commands_this_test_is_meant_for():
    found = [c for _, c in all_commands()]
    for prefix in ("python run.py --config", "python run.py predict", "python run.py sweep", "python run.py summarize",
                   "python -m gaze", "python -m prepare kvasir", "python -m prepare nci-isbi", "bash scripts/"):
        assert any(c.startswith(prefix) for c in found), prefix


@pytest.mark.parametrize("where,command", all_commands(), ids=lambda v: v if ":" in v else None)
def test_documented_command_matches_the_code(where, command):
    assert check_command(command) == [], f"{where}: {command}"


def test_the_checker_finds_wrong_commands():
    """The checks above would catch what they are for: a renamed flag, an abbreviation, a bad choice, a flag
    of another command, a missing config, a flag after the sweep's `--` that run.py lacks."""
    assert check_command("python run.py --config configs/kvasir_gaze_sup_2_levels.yaml --root R") == []
    assert check_command("python run.py --maxite 5") == ["--maxite: no such flag in python run.py"]
    assert check_command("python run.py --max 5") == ["--max: no such flag in python run.py"]
    assert check_command("python run.py --opt lamb")[0].startswith("--opt lamb: not one of")
    assert check_command("python run.py --max_ite many")[0].startswith("--max_ite many: not accepted")
    assert check_command("python run.py predict --ckpt_path R --input a b --out o --save_pred") == \
        ["--save_pred: no such flag in python run.py predict"]
    assert check_command("python run.py --config configs/nope.yaml") == ["configs/nope.yaml: no such file in the "
                                                                         "repository"]
    assert check_command("python -m prepare kvasir --src S --out O --boxes B --box-crf") == []
    assert check_command("python -m prepare nci-isbi --labels L --boxes B") == \
        ["--boxes: no such flag in python -m prepare"]
    assert check_command("python -m gaze --csv c --root r --data d --crf-backend cuda")[0].startswith(
        "--crf-backend cuda: not one of")
    assert check_command("python -m no_such_module_here") == ["python -m no_such_module_here: no such module"]
    assert check_command("bash scripts/nope.sh") == ["scripts/nope.sh: no such script"]


def test_sweep_passes_flags_after_the_separator_to_run_py():
    ok = "python run.py sweep --presets 'kvasir_*' --root R --exp_path E -- --amp bf16 --num_worker 8"
    assert check_command(ok) == []
    assert check_command(ok + " --no_such_flag") == ["--no_such_flag: no such flag in python run.py"]


# ---------------------------------------------------------------- links
def slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    text = re.sub(r"[`*_]", lambda m: "_" if m.group(0) == "_" else "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set:
    code, prose = split_fences(path.read_text())
    seen: dict = {}
    for _, line in prose:
        if line.startswith("#"):
            base = slug(line.lstrip("#"))
            count = seen.get(base, 0)
            seen[base] = count + 1
            seen.setdefault(f"{base}-{count}" if count else base, 1)
    return set(seen)


def links() -> list[tuple[str, Path, str]]:
    """(where, file, target) of every Markdown link outside code blocks."""
    found = []
    for path in DOCS:
        _, prose = split_fences(path.read_text())
        for n, line in prose:
            line = re.sub(r"`[^`]*`", "", line)
            for target in re.findall(r"\]\(([^)\s]+)\)", line):
                found.append((f"{rel(path)}:{n}", path, target))
    return found


def test_every_relative_link_resolves():
    problems = []
    for where, path, target in links():
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            if rel(dest) not in PENDING:
                problems.append(f"{where}: {target}: no such file")
            continue
        if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{where}: {target}: no heading #{anchor} in {rel(dest)}")
    assert problems == []


def test_repository_paths_in_prose_exist():
    """`configs/...`, `scripts/...`, `tests/...` and `....py` named in the text are files of the repository."""
    missing = []
    for path in DOCS:
        _, prose = split_fences(path.read_text())
        for n, line in prose:
            for span in re.findall(r"`([^`\s]+)`", line):
                named = span.startswith(("configs/", "scripts/", "tests/")) or re.fullmatch(r"[\w/]+\.py", span)
                if named and not re.search(r"[<*]", span) and not (REPO / span).exists():
                    missing.append(f"{rel(path)}:{n}: {span}")
    assert missing == []


def test_links_are_checked():
    """The docs link to one another (so the test above has something to check), anchors included."""
    targets = [t for _, _, t in links()]
    assert len(targets) > 30 and any("#" in t and not t.startswith("#") for t in targets)


def test_pending_files_are_still_missing():
    """PENDING lists files other branches are writing; once one is merged, its link is checked like any other."""
    assert sorted(p for p in PENDING if (REPO / p).exists()) == []
    linked = {rel((path.parent / t.partition("#")[0]).resolve()) for _, path, t in links() if not re.match(
        r"[a-z]+:", t) and t.partition("#")[0]}
    assert PENDING <= linked


# ---------------------------------------------------------------- content checked against the code
def test_readme_is_a_front_door():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 150
    assert "pip install -r requirements.txt && python run.py --demo" in readme
    assert "pip install -r requirements-dev.txt && python -m pytest -q tests" in readme


def test_user_docs_hold_no_editing_notes():
    for path in DOCS:
        text = path.read_text()
        assert not re.search(r"BEGIN SECTION|END SECTION|\bissue #?\d+|\bIssue \d+|this round|TODO", text), rel(path)


def yaml_blocks(text: str) -> list[str]:
    blocks, current = [], None
    for line in text.splitlines():
        if current is None and line.strip() == "```yaml":
            current = []
        elif current is not None and line.strip() == "```":
            blocks.append("\n".join(current))
            current = None
        elif current is not None:
            current.append(line)
    return blocks


def test_dataset_spec_examples_parse():
    """The spec examples in the docs are specs the code accepts, and the reference names every key they use."""
    import yaml

    from common.dataspec import parse_spec

    reference = (REPO / "docs" / "reference" / "dataset-spec.md").read_text()
    specs = []
    for path in DOCS:
        for text in yaml_blocks(path.read_text()):
            raw = yaml.safe_load(text)
            if isinstance(raw, dict) and "image_ext" in raw:
                specs.append((rel(path), raw))
    assert len(specs) >= 2
    for where, raw in specs:
        parse_spec(raw, where)
        assert all(f"| `{key}` |" in reference for key in raw), where


def test_quoted_config_files_are_the_files():
    """A YAML block introduced by "This is `configs/....yaml`:" shows that file, byte for byte."""
    quoted = 0
    for path in DOCS:
        text = path.read_text()
        for name, block in re.findall(r"This is\s+`(configs/[^`]+\.yaml)`:\n\n```yaml\n(.*?)```", text, re.S):
            assert block == (REPO / name).read_text(), f"{rel(path)}: {name}"
            quoted += 1
    assert quoted >= 1


def test_override_table_is_the_flags_roles():
    """docs/reference/run-folder.md's table of the flags --test, --resume and predict may change is what
    parse_args.py declares (for predict: those of its flags that it may change)."""
    import parse_args

    rows = {}
    for line in (REPO / "docs" / "reference" / "run-folder.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| `") and len(cells) == 3:
            rows[cells[0].strip("`")] = set(re.findall(r"`--(\w+)`", cells[1]))
    predict_flags = {a.dest for a in load(PARSERS["python run.py predict"])._actions}
    assert rows == {
        "--test": set(parse_args.flags_with(parse_args.TEST_SAFE)),
        "--resume": set(parse_args.flags_with(parse_args.RESUME_SAFE)),
        "predict": set(parse_args.flags_with(parse_args.PREDICT_SAFE)) & predict_flags,
    }


def test_every_run_flag_is_in_the_flag_reference():
    flags_md = REPO / "docs" / "reference" / "flags.md"
    if not flags_md.exists() and "docs/reference/flags.md" in PENDING:
        pytest.skip("docs/reference/flags.md is generated on another branch (see PENDING)")
    text = flags_md.read_text()
    flags = [s for s in options(load(PARSERS["python run.py"])) if s.startswith("--") and s != "--help"]
    assert flags and [f for f in flags if f"`{f}" not in text and f" {f}" not in text] == []
