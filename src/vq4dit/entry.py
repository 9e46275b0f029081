"""What every entry point shares: bad input ends in one line on stderr and exit status 2, no traceback."""

import sys
from collections.abc import Callable

from vq4dit.errors import UserError


def run(job: Callable[[], object]) -> object:
    try:
        return job()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
