"""Errors a user can fix. The CLIs print them as one line (no traceback unless --debug)."""


class UserError(Exception):
    """Bad input: a config key, a file, a line. The message must name it."""


def did_you_mean(name: str, choices) -> str:
    """' (did you mean: a, b?)' for the closest valid names, or '' when none is close."""
    import difflib

    close = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.6)
    return f" (did you mean: {', '.join(close)}?)" if close else ""


def disk_full_in(err: BaseException):
    """The OSError "no space left" / "quota exceeded" behind `err` (its causes, contexts, and the per-rank
    failures torch.distributed.checkpoint collects), or None."""
    import errno

    stack, seen = [err], set()
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in (errno.ENOSPC, errno.EDQUOT):
            return current
        stack += [current.__cause__, current.__context__]
        failures = getattr(current, "failures", None)  # CheckpointException: {rank: (exception, traceback)}
        if isinstance(failures, dict):
            stack += [f[0] if isinstance(f, tuple) else f for f in failures.values()]
    return None


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else ""


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
    except (SystemExit, GeneratorExit):
        raise
    except BaseException as err:  # noqa: BLE001 - turns failures into a line (torch's CheckpointException too)
        if debug:
            raise
        # Some messages carry whole tracebacks (CheckpointException: one per failed rank): their first line only.
        print(f"error: {type(err).__name__}: {_first_line(err)} (run with --debug for the traceback)",
              file=sys.stderr)
        return 1
