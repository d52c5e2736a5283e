"""One rank of test_live_ranks.py: live evaluation at one step, under a collective timeout shorter than the suite.

python tests/eval/live_ranks.py SUITE TOKENIZER OUT_JSON TIMEOUT_S   (RANK, WORLD_SIZE, MASTER_* in the environment)

Only the live evaluation's group gets the short timeout: the ranks start seconds apart on a loaded machine (imports),
so meeting under it failed in CI; they meet under a generous one and pass a barrier first.
"""
import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as torch_dist

RENDEZVOUS_S = 300


def main(suite: str, tokenizer: str, out: str, timeout_s: float) -> None:
    from modernbert_train.common.ranks import DIST_TIMEOUT_ENV
    from modernbert_train.eval.live import LiveEvaluation
    from modernbert_train.model import ModernBertForMaskedLM
    from modernbert_train.train.metrics_file import MetricsFile
    from tests.eval.conftest import micro_config

    torch_dist.init_process_group("gloo", timeout=timedelta(seconds=RENDEZVOUS_S))
    torch_dist.barrier()
    os.environ[DIST_TIMEOUT_ENV] = str(timeout_s)  # the group the evaluation makes (new_gloo_group) waits this long
    rank = torch_dist.get_rank()
    torch.manual_seed(0)
    config = micro_config(tokenizer)
    model = ModernBertForMaskedLM(config)
    metrics = MetricsFile(Path(out).with_suffix(f".metrics{rank}.jsonl"))
    live = LiveEvaluation(suite, "2ba", metrics, "phase1", config, tokenizer)
    logged: list = []
    state = SimpleNamespace(model=SimpleNamespace(model=model), timestamp=SimpleNamespace(batch=2, token=1000))
    started = time.monotonic()
    live.batch_end(state, SimpleNamespace(log_metrics=logged.append))
    elapsed = time.monotonic() - started
    flag = torch.ones(1)
    torch_dist.all_reduce(flag)  # the group still works afterwards
    Path(out).with_suffix(f".rank{rank}.json").write_text(json.dumps(
        {"elapsed": elapsed, "logged": logged, "after": flag.item()}))
    torch_dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]))
