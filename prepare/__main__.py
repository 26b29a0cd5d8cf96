"""`python -m prepare ...`: see prepare/cli.py."""
import sys

from prepare.cli import main

if __name__ == "__main__":
    sys.exit(main())
