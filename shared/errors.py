"""The one exception type for user mistakes: the CLI prints it as one line and exits non-zero."""

import re

# A check inside a TensorFlow graph (a tf.data map) cannot raise UserError: it fails its op with the message
# between these marks (shared.data.checks), and `embedded_user_error` finds it in the op's error.
EMBED_START, EMBED_END = "<user-error>", "</user-error>"


class UserError(Exception):
    """A problem the user can fix (bad config, missing data, unknown run); the message says how."""

    # raised while TensorFlow traces a function: autograph re-raises it as it is, without its source listing
    ag_pass_through = True


def embedded_user_error(error: BaseException) -> UserError | None:
    """The UserError a graph check embedded in `error`'s message (see EMBED_START), else None."""
    match = re.search(re.escape(EMBED_START) + "(.*?)" + re.escape(EMBED_END), str(error), re.DOTALL)
    if not match:
        return None
    # TF prints the message escaped (\' for ', \303\251 or \xc3\xa9 for é): undo that
    raw = re.sub(rb"\\([0-7]{3}|x[0-9a-fA-F]{2}|['\"\\])", _unescape, match.group(1).encode())
    return UserError(raw.decode("utf-8", "replace"))


def first_line(error: BaseException) -> str:
    """An error in one line for a status file or a message: an embedded check's own line, else the type and the
    first line of the message."""
    embedded = embedded_user_error(error)  # a data check inside the pipeline: its own one line
    if embedded is not None:
        return str(embedded)
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:500] if text else ''}"


def _unescape(match: re.Match) -> bytes:
    code = match.group(1)
    if len(code) == 1:
        return code
    return bytes([int(code[1:], 16) if code.startswith(b"x") else int(code, 8)])


def run_cli(action, interrupted: str = "interrupted") -> int:
    """Run a command-line action: a UserError (or one a graph check embedded in a TensorFlow error) becomes
    one line `error: ...` on stderr and exit status 2, Ctrl-C status 130; anything else is a bug and keeps
    its traceback."""
    import sys

    for stream in (sys.stdout, sys.stderr):  # an ASCII locale must not turn a Unicode name into a crash
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    try:
        action()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except Exception as error:
        embedded = embedded_user_error(error)
        if embedded is None:
            raise
        print(f"error: {embedded}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:
        print(str(stop) if str(stop) and not str(stop).startswith("signal") else interrupted, file=sys.stderr)
        return 130
    return 0
