"""Issue 17, finding 1 for `prepare --overwrite`: the shared deletion guard (modernbert_train/common/safety.py)."""
import json

import pytest

from modernbert_train.common.errors import UserError
from tests.data_prep.conftest import run_prepare


def test_overwrite_never_empties_the_current_or_home_directory(trained_tokenizer_dir, tmp_path, monkeypatch):
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(5)))
    out = tmp_path / "out"
    run_prepare([data], out, trained_tokenizer_dir, max_seq_len=64)
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    monkeypatch.chdir(out)
    with pytest.raises(UserError, match=r"^--out \. is the current directory; refusing to replace it"):
        run_prepare([data], ".", trained_tokenizer_dir, max_seq_len=128, overwrite=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(out))
    with pytest.raises(UserError, match=r"is your home directory; refusing to replace it"):
        run_prepare([data], out, trained_tokenizer_dir, max_seq_len=128, overwrite=True)
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert run_prepare([data], out, trained_tokenizer_dir, max_seq_len=128, overwrite=True)["written"] == 5
