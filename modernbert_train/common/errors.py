"""Errors a user can fix. The CLIs print them as one line (no traceback unless --debug)."""


class UserError(Exception):
    """Bad input: a config key, a file, a line. The message must name it."""


def did_you_mean(name: str, choices) -> str:
    """' (did you mean: a, b?)' for the closest valid names, or '' when none is close."""
    import difflib

    close = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.6)
    return f" (did you mean: {', '.join(close)}?)" if close else ""


def run_command(command, args, debug: bool) -> int:
    """Run one CLI command: UserError -> one line and exit 2, any other failure -> one line and exit 1.

    The one place where failures become exit codes, for every CLI of the project; --debug re-raises.
    """
    import sys

    try:
        return int(command(args) or 0)
    except UserError as err:
        if debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - turns failures into a line
        if debug:
            raise
        print(f"error: {type(err).__name__}: {err} (run with --debug for the traceback)", file=sys.stderr)
        return 1
