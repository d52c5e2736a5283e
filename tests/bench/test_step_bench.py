"""The benchmark script runs end to end in its tiny CPU mode and reports parity and a full table."""
import importlib.util
import re
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "step_bench.py"


def test_step_bench_tiny_cpu_prints_parity_and_ratios(capsys):
    spec = importlib.util.spec_from_file_location("step_bench", BENCH)
    bench = importlib.util.module_from_spec(spec)
    sys.modules["step_bench"] = bench  # dataclasses look their module up there
    spec.loader.exec_module(bench)
    assert bench.main(["--device", "cpu", "--preset", "micro", "--seq-lens", "64", "--tokens", "512",
                       "--steps", "1", "--warmup", "0"]) == 0
    out = capsys.readouterr().out
    error = float(re.search(r"parity sdpa .* max relative logit error (\S+)", out).group(1))
    assert error < 1e-5
    rows = re.findall(r"^\s+64 (fixed|variable)\s+(\S+)\s+([\d,]+)\s.*?([\d.]+)x$", out, flags=re.M)
    names = {(kind, name) for kind, name, _, _ in rows}
    for kind in ("fixed", "variable"):
        assert {(kind, "ours-sdpa"), (kind, "hf-sdpa-sparse"), (kind, "hf-sdpa-full")} <= names
    assert all(float(ratio) > 0 and int(tok.replace(",", "")) > 0 for _, _, tok, ratio in rows)
    assert "failed" not in out
