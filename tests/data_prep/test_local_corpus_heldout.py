"""The stdlib files reserved for evaluation: decided by path alone, in one place, and left out of every part
of the local corpus (code, docstrings, pages of the Python docs)."""
import json
from pathlib import Path

from modernbert_train.eval import heldout as local_corpus
from data_prep.local_corpus import (EVAL_TOPIC_PACKAGES, build_prose, documents_reserved_module, reserved_for_eval,
                                    stdlib_dir, stdlib_python_files)


def test_reserved_files_are_the_topic_packages_and_a_fixed_share_of_the_rest():
    root = stdlib_dir()
    files = [p.relative_to(root) for p in stdlib_python_files(root)]
    reserved = [p for p in files if reserved_for_eval(p)]
    assert reserved == [p.relative_to(root) for p in stdlib_python_files(root, reserved=True)]
    assert all(reserved_for_eval(str(p)) == reserved_for_eval(p) for p in files[:50])  # a str or a Path alike
    for name in ("turtle.py", "_pydecimal.py", "asyncio/tasks.py", "email/mime/text.py", "logging/handlers.py",
                 "tkinter/ttk.py"):
        assert reserved_for_eval(name), name
    others = [p for p in files if p.parts[0].removesuffix(".py") not in EVAL_TOPIC_PACKAGES]
    share = sum(reserved_for_eval(p) for p in others) / len(others)
    assert 0.3 < share < 0.4, share
    assert set(stdlib_python_files(root, reserved=False)).isdisjoint(stdlib_python_files(root, reserved=True))


def test_doc_pages_of_reserved_modules_are_left_out(tmp_path, monkeypatch):
    root = stdlib_dir()
    by_hash = next(p.stem for p in sorted(root.glob("*.py")) if reserved_for_eval(p.name) and p.stem not in
                   EVAL_TOPIC_PACKAGES and not p.stem.startswith("_"))
    kept_module = next(p.stem for p in sorted(root.glob("*.py")) if not reserved_for_eval(p.name)
                       and not p.stem.startswith("_") and not (root / f"_py{p.stem}.py").exists())
    docs = tmp_path / "docs"
    pages = {"library/turtle.rst.txt": False, "library/asyncio-task.rst.txt": False,
             "library/email.mime.rst.txt": False, "library/decimal.rst.txt": False,  # its docstrings: _pydecimal
             f"library/{by_hash}.rst.txt": False, f"library/{kept_module}.rst.txt": True,
             "tutorial/introduction.rst.txt": True}
    for page in pages:
        (docs / page).parent.mkdir(parents=True, exist_ok=True)
        (docs / page).write_text(f"{page}\n=====\n")
    assert {page: not documents_reserved_module(page) for page in pages} == pages
    monkeypatch.setattr(local_corpus, "PYTHON_DOC_SOURCES", docs)
    info = build_prose(tmp_path / "prose")
    copied = {p.relative_to(tmp_path / "prose" / "python_docs").as_posix()
              for p in (tmp_path / "prose" / "python_docs").rglob("*.txt")}
    assert copied == {page for page, kept in pages.items() if kept} and info["python_docs"]["files"] == 2
    ids = [json.loads(line)["id"] for line in (tmp_path / "prose" / "docstrings.jsonl").open()]
    assert ids and not [i for i in ids if reserved_for_eval(Path(i))]
