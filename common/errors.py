"""One error discipline for every command: a mistake the user can fix is a `UserError`, reported as
`error: <message>` on stderr with exit status 2; anything else is a bug and keeps its traceback."""
import argparse
import sys
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


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are a `UserError` (one `error:` line, exit 2) instead of a usage block."""

    def error(self, message: str):
        raise UserError(f"{self.prog}: {message} (see {self.prog} --help)")
