"""One error discipline for every command: a mistake the user can fix is a `UserError`, reported as
`error: <message>` on stderr with exit status 2; anything else is a bug and keeps its traceback."""
import sys
from typing import Callable, List, Optional


class UserError(ValueError):
    """A user-fixable problem (bad flag, file or value); the message names it and what was expected."""


USAGE_EXIT = 2


def report_user_error(e: BaseException, prog: str = "") -> int:
    """Print `error: ...` (prefixed with `prog: ` when given) to stderr; return the exit status 2."""
    prefix = f"{prog}: " if prog else ""
    print(f"{prefix}error: {e}", file=sys.stderr)
    return USAGE_EXIT


def run_cli(main: Callable[[Optional[List[str]]], int], argv: Optional[List[str]] = None, prog: str = "") -> int:
    """Call `main(argv)`; a UserError becomes exit status 2 with one message, no traceback."""
    try:
        return main(argv)
    except UserError as e:
        return report_user_error(e, prog)
