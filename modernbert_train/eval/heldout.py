"""Which stdlib files and Python docs pages are held out of pretraining for evaluation: the one rule that the
local corpus (data_prep/local_corpus.py) and the local evaluation tasks (eval/local_tasks.py) both ask.
"""
from __future__ import annotations

import hashlib
import os
import sysconfig
from pathlib import Path, PurePosixPath

PYTHON_DOC_SOURCES = Path("/usr/share/doc/python3.11/html/_sources")
# Directories of the stdlib that are tests, third-party installs or build leftovers, not library code.
EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "_bundled",
                 "lib2to3_tests"}


# Reserved for evaluation: every module of the packages the topic task classifies (turtle and _pydecimal are
# single modules, which a share of files could not split), and this share of the other files, picked by a
# stable hash of their path under the stdlib root. The share is what gives every local task its full default
# sizes (the retrieval pool needs 1,200 functions with docstrings from the other files).
EVAL_TOPIC_PACKAGES = ("asyncio", "email", "logging", "tkinter", "turtle", "_pydecimal")
EVAL_FILE_SHARE = 0.35
# Recorded with what was built, so that a corpus or task folder made under another rule is recognisable.
EVAL_RESERVATION = f"packages {','.join(EVAL_TOPIC_PACKAGES)} + sha256(path) share {EVAL_FILE_SHARE}"


def reserved_for_eval(relative_path: str | os.PathLike) -> bool:
    """Whether a stdlib file (path relative to the stdlib root) belongs to the evaluation tasks, never to the
    pretraining corpus. The one place that decides it: the corpus and the local tasks both ask here."""
    path = PurePosixPath(Path(relative_path).as_posix())
    if path.parts[0].removesuffix(".py") in EVAL_TOPIC_PACKAGES:
        return True
    digest = hashlib.sha256(f"eval-reserved:{path}".encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < EVAL_FILE_SHARE


def documents_reserved_module(page: str | os.PathLike, root: Path | None = None) -> bool:
    """Whether a page of the Python docs (path under PYTHON_DOC_SOURCES) documents a module reserved for
    evaluation: library/asyncio-task.rst.txt documents asyncio, library/decimal.rst.txt decimal and its
    pure-Python implementation _pydecimal, whose docstrings the page repeats."""
    page = PurePosixPath(Path(page).as_posix())
    if page.parts[0] != "library":
        return False
    root = root or stdlib_dir()
    parts = page.name.split(".rst")[0].split(".txt")[0].split("-")[0].split(".")
    candidates = ["/".join(parts) + ".py", "/".join(parts) + "/__init__.py", f"_py{parts[0]}.py"]
    return any((root / name).is_file() and reserved_for_eval(name) for name in candidates)


def python_doc_pages(root: Path | None = None) -> list[Path]:
    """The pages of the Python docs (when installed) the corpus may take: all but those of reserved modules."""
    if not PYTHON_DOC_SOURCES.is_dir():
        return []
    return [page for page in sorted(PYTHON_DOC_SOURCES.rglob("*.txt"))
            if not documents_reserved_module(page.relative_to(PYTHON_DOC_SOURCES), root)]


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_python_files(root: Path | None = None, reserved: bool | None = None) -> list[Path]:
    """The stdlib's .py files in a deterministic order, test directories and site-packages excluded;
    `reserved` True / False keeps only the files reserved / not reserved for evaluation."""
    root = root or stdlib_dir()
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in EXCLUDED_DIRS and not d.startswith(("config-", ".")))
        found.extend(Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py"))
    if reserved is not None:
        found = [path for path in found if reserved_for_eval(path.relative_to(root)) == reserved]
    return found
