"""Live evaluation on 2 ranks whose collective timeout is shorter than the suite: rank 0 evaluates while the
other rank waits in short collectives, so neither hits the timeout (a barrier held through the suite did)."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
TIMEOUT_S = 2.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_live_evaluation_longer_than_the_collective_timeout(tmp_path, toy_tasks, eval_tokenizer):
    suite = tmp_path / "live.yaml"
    suite.write_text(yaml.safe_dump({"name": "live", "tasks": [
        {"name": "topic", "type": "classification", "max_length": 32,
         "data": {"train": f"{toy_tasks}/cls/train.jsonl", "dev": f"{toy_tasks}/cls/dev.jsonl",
                  "columns": {"text": "sentence", "label": "topic"}},
         "sweep": {"lr": [3e-3], "epochs": [40], "batch_size": 8, "seeds": [0, 1]}}]}))
    out = tmp_path / "out.json"
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE="2",
               PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    procs = [subprocess.Popen([sys.executable, str(REPO / "tests/eval/live_ranks.py"), str(suite), str(eval_tokenizer),
                               str(out), str(TIMEOUT_S)], env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outputs)
    ranks = [json.loads(out.with_suffix(f".rank{r}.json").read_text()) for r in range(2)]
    assert min(r["elapsed"] for r in ranks) > 2 * TIMEOUT_S  # the suite really outlasted the timeout
    assert all(r["after"] == 2.0 for r in ranks)
    scores = ranks[0]["logged"][0]
    assert 0 <= scores["live_eval/topic/accuracy"] <= 1 and ranks[1]["logged"] == []
    record = json.loads(out.with_suffix(".metrics0.jsonl").read_text().splitlines()[0])
    assert record["step"] == 2 and record["live_eval/topic/accuracy"] == scores["live_eval/topic/accuracy"]
    assert not out.with_suffix(".metrics1.jsonl").exists() or not out.with_suffix(".metrics1.jsonl").read_text()
