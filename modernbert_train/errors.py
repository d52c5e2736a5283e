"""Errors a user can fix. The CLIs print them as one line (no traceback unless --debug)."""


class UserError(Exception):
    """Bad input: a config key, a file, a line. The message must name it."""


def did_you_mean(name: str, choices) -> str:
    """' (did you mean: a, b?)' for the closest valid names, or '' when none is close."""
    import difflib

    close = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.6)
    return f" (did you mean: {', '.join(close)}?)" if close else ""
