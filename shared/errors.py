"""The one exception type for user mistakes: the CLI prints it as one line and exits non-zero."""


class UserError(Exception):
    """A problem the user can fix (bad config, missing data, unknown run); the message says how."""
