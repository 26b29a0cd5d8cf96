"""One error discipline for every command: a mistake the user can fix is a `UserError`, reported as
`error: <message>` on stderr with exit status 2; anything else is a bug and keeps its traceback."""
import argparse
import difflib
import sys
from pathlib import Path
from typing import Callable, List, Optional


class UserError(ValueError):
    """A user-fixable problem (bad flag, file or value); the message names it and what was expected."""


class UserErrors(UserError):
    """Several independent problems found before anything started: one `error:` line each."""

    def __init__(self, problems: List[str]):
        super().__init__("; ".join(problems))
        self.problems = list(problems)


USAGE_EXIT = 2
INTERRUPTED_EXIT = 130  # a run stopped by SIGINT/SIGTERM after saving model_latest.pth (as the shell's 128+2)


def one_line(e) -> str:
    """The message of `e` on one line. An error raised in a DataLoader worker arrives wrapped in the
    worker's traceback; its last line is the original message, shown as with --num_worker 0."""
    text = str(e)
    if "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        head, _, rest = last.partition(": ")
        text = rest if rest and head.replace(".", "").isidentifier() else last
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def report_user_error(e, prog: str = "") -> int:
    """Print `error: <one line>` (prefixed with `prog: ` when given) to stderr; return the exit status 2."""
    prefix = f"{prog}: " if prog else ""
    for problem in getattr(e, "problems", None) or [e]:
        print(f"{prefix}error: {one_line(problem)}", file=sys.stderr)
    return USAGE_EXIT


def run_cli(main: Callable[[Optional[List[str]]], int], argv: Optional[List[str]] = None, prog: str = "") -> int:
    """Call `main(argv)`; a UserError becomes exit status 2 with one message, no traceback."""
    try:
        return main(argv)
    except UserError as e:
        return report_user_error(e, prog)


def command_name(default: str) -> str:
    """How the user called the command, for usage and errors: `default` (run.py ..., python -m gaze) unless it
    runs as an installed console command (gazesup, gazesup-gaze, gazesup-prepare; see pyproject.toml)."""
    name = Path(sys.argv[0]).name
    if not name.startswith("gazesup"):
        return default
    return name + default[len("run.py"):] if default.startswith("run.py") else name


def _other_spelling(flag: str) -> str:
    """--max_ite <-> --max-ite (the part after the leading dashes)."""
    body = flag[2:]
    return "--" + (body.replace("_", "-") if "_" in body else body.replace("-", "_"))


def _canonical(flag: str) -> str:
    return flag.replace("-", "_")


class _VersionAction(argparse.Action):
    """--version: the package version and the code's commit, computed only when asked for."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0,
                         help=help or "print the package version and the code's git commit, and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        from common.version import version_text
        print(version_text(parser.prog))
        parser.exit()


class OneLineParser(argparse.ArgumentParser):
    """argparse for every command of the project:
    - usage errors are a `UserError` (one `error:` line, exit 2) instead of a usage block;
    - each long flag is accepted with underscores or dashes (`--split_dir` = `--split-dir`); help shows the
      spelling it was declared with;
    - an unknown flag names the close one (`--max_iter`: did you mean --max_ite?);
    - `--version` prints the package version and the code's commit."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.add_help:
            self.add_argument("--version", action=_VersionAction)

    def _flags(self) -> list[str]:
        """The long flags of this parser and of its subcommands."""
        flags = [s for s in self._option_string_actions if s.startswith("--")]
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    flags += sub._flags() if isinstance(sub, OneLineParser) else []
        return flags

    def _spelled(self, arg: str) -> str:
        """`arg` (--flag or --flag=value) in the spelling this parser declares, when only the other one is."""
        if not arg.startswith("--") or arg == "--":
            return arg
        flag, eq, value = arg.partition("=")
        known = self._option_string_actions
        if flag in known:
            return arg
        other = _other_spelling(flag)
        if other in known or any(s.startswith(other) for s in known):  # exact, or a prefix argparse accepts
            return other + eq + value
        return arg

    def parse_known_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        stop = args.index("--") if "--" in args else len(args)  # what follows `--` belongs to someone else
        args = [self._spelled(a) for a in args[:stop]] + args[stop:]
        self._given = args[:stop]
        return super().parse_known_args(args, namespace)

    def error(self, message: str):
        raise UserError(f"{self.prog}: {self.suggest(message)} (see {self.prog} --help)")

    def suggest(self, message: str) -> str:
        """`message` plus `did you mean --x?` for each unknown flag close to a known one. Also for a usage
        error that an unknown flag caused (`--split_dirr X`: "--split-dir is required")."""
        flags = sorted(set(self._flags()))
        by_canonical = {_canonical(f): f for f in flags}
        known = set(flags)
        unknown = [a.partition("=")[0] for a in getattr(self, "_given", [])
                   if a.startswith("--") and a != "--" and a.partition("=")[0] not in known
                   and not any(f.startswith(a.partition("=")[0]) for f in known)]  # not a prefix argparse takes
        hints = []
        for flag in dict.fromkeys(unknown):
            close = difflib.get_close_matches(_canonical(flag), list(by_canonical), n=1, cutoff=0.75)
            if close:
                hints.append(f"{flag}: did you mean {by_canonical[close[0]]}?")
        if not hints:
            return message
        if message.startswith("unrecognized arguments"):
            return f"{message} ({'; '.join(hints)})"
        return f"{message}; unrecognized {'; '.join(hints)}"
