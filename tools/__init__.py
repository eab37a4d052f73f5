"""Command-line programs. `error` is how each reports a user's mistake."""

import sys


def error(e: BaseException, suffix: str = "") -> int:
    """Print the error as one line on stderr (a multi-line message's lines joined by "; ") and
    return exit code 2, the code every program here gives for bad input."""
    lines = [line.strip() for line in (str(e) or type(e).__name__).splitlines() if line.strip()]
    print(f"error: {'; '.join(lines)}{suffix}", file=sys.stderr)
    return 2
