"""The one exception type for user mistakes: the CLI prints it as one line and exits non-zero."""


class UserError(Exception):
    """A problem the user can fix (bad config, missing data, unknown run); the message says how."""


def run_cli(action, interrupted: str = "interrupted") -> int:
    """Run a command-line action: a UserError becomes one line `error: ...` on stderr and exit status 2,
    Ctrl-C status 130; anything else is a bug and keeps its traceback."""
    import sys

    try:
        action()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:
        print(str(stop) if str(stop) and not str(stop).startswith("signal") else interrupted, file=sys.stderr)
        return 130
    return 0
