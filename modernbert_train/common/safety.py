"""The one guard every deleting command passes before it removes a folder it is asked to replace.

A folder may be replaced only when it is recognisably what the command itself wrote before (the caller says
what that looks like: its own file names and markers), and never when it is the filesystem root, a home
directory, the current directory, anything that contains one of those, a symbolic link, or something the
command still needs (its source; any parent of it). `remove_tree` is the guard and the deletion in one call.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable

from modernbert_train.common.errors import UserError


def _contains(folder: Path, other: Path) -> bool:
    return folder == other or folder in other.parents


def _never_replaced() -> list[tuple[Path, str]]:
    places = [(Path.cwd().resolve(), "the current directory")]
    home = os.environ.get("HOME")
    for candidate in {Path.home(), Path(home)} if home else {Path.home()}:
        places.append((candidate.resolve(), "your home directory"))
    return places


def check_safe_to_replace(path: str | os.PathLike, *, label: str,
                          recognise: Callable[[Path], str | None] | None = None,
                          keep: Iterable[str | os.PathLike] = ()) -> None:
    """Raise UserError (one line, naming `label` and the folder) unless `path` may be deleted and rewritten.

    recognise(folder) -> None when the folder is what this command wrote before, else the reason it is not.
    keep: paths the command still reads (e.g. the checkpoint being exported): neither they nor any folder
    holding them may be replaced. A path that does not exist yet is always fine.
    """
    target = Path(path)
    if not target.exists() and not target.is_symlink():
        return
    resolved = target.resolve()
    if target.is_symlink():
        raise UserError(f"{label} {target} is a symbolic link (to {resolved}); refusing to replace it — "
                        f"remove the link yourself or choose another {label}")
    if resolved == Path(resolved.anchor):
        raise UserError(f"{label} {target} is the filesystem root; refusing to replace it")
    for place, what in _never_replaced():
        if _contains(resolved, place):
            detail = what if resolved == place else f"a folder holding {what} ({place})"
            raise UserError(f"{label} {target} is {detail}; refusing to replace it — choose a new folder")
    for needed in keep:
        needed_path = Path(needed).resolve()
        if _contains(resolved, needed_path):
            detail = "is" if resolved == needed_path else "holds"
            raise UserError(f"{label} {target} {detail} {needed}, which this command reads; refusing to replace "
                            f"it — choose another {label}")
    if recognise is not None and resolved.is_dir():
        reason = recognise(resolved)
        if reason:
            raise UserError(f"{label} {target} {reason}; refusing to replace it — choose a new or empty folder "
                            f"(nothing was deleted)")


def only_these_entries(allowed: Callable[[str], bool], required: Iterable[str], what: str
                       ) -> Callable[[Path], str | None]:
    """A `recognise` for folders whose entries a command writes itself: all of `required`, nothing unknown."""
    required = tuple(required)

    def recognise(folder: Path) -> str | None:
        names = sorted(p.name for p in folder.iterdir())
        if not names:
            return None
        foreign = [n for n in names if not allowed(n)]
        if foreign:
            more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
            return f"holds {', '.join(foreign[:3])}{more}, which {what} does not write"
        missing = [n for n in required if n not in names]
        if missing:
            return f"is not {what} (it has no {missing[0]})"
        return None

    return recognise


def remove_tree(path: str | os.PathLike, *, label: str, recognise: Callable[[Path], str | None] | None,
                keep: Iterable[str | os.PathLike] = ()) -> bool:
    """check_safe_to_replace, then delete `path` (a folder and everything in it, or a file); False if absent.

    recognise is required in spirit: pass None only where the folder's name alone is the command's own
    (a scratch folder it created under a name no one else uses)."""
    import shutil

    check_safe_to_replace(path, label=label, recognise=recognise, keep=keep)
    target = Path(path)
    if target.is_dir():
        shutil.rmtree(target)
        return True
    if target.exists():
        target.unlink()
        return True
    return False


def main(argv: list[str] | None = None) -> int:
    """`python -m modernbert_train.common.safety --remove PATH ...`: the same guard for the launch scripts' deletions."""
    import argparse

    from modernbert_train.common.errors import run_command

    parser = argparse.ArgumentParser(prog="python -m modernbert_train.common.safety",
                                     description="Remove folders through the project's deletion guard.",
                                     epilog="example:  python -m modernbert_train.common.safety --remove "
                                            "/tmp/modernbert-me-4242-node0")
    parser.add_argument("--remove", nargs="+", required=True, metavar="PATH",
                        help="folders to delete (refused: /, a home or the current directory, symbolic links)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of a failure")
    args = parser.parse_args(argv)

    def remove(args) -> int:
        for path in args.remove:
            remove_tree(path, label="scratch folder", recognise=None)  # names the launch scripts gave them
        return 0

    return run_command(remove, args, args.debug)


if __name__ == "__main__":
    raise SystemExit(main())
