"""Plots and a summary of one run, or of a chain of phases, from each run directory's `metrics.jsonl`.

A run directory (the trainer's save_folder) holds `config.yaml` (the resolved recipe) and `metrics.jsonl`: one
JSON object per line with "step", "tokens" (cumulative real tokens), "time_s", "phase" and optional metric keys
(see `METRIC_LABELS`). Several run directories are read in order and stitched on one token axis: each phase
counts its own tokens from zero, so phase k is drawn after the last token of phase k-1.

`write_report(run_dirs, out_dir)` writes one PNG per plot (drawn by report_plots.py), `report.md` and
`report.html` into out_dir.
"""
from __future__ import annotations

import html
import json
import math
import os
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Sequence

import numpy as np

from modernbert_train.common.errors import UserError
from modernbert_train.run.plots import (EVAL_PLOT_FILE, PLOTS, PlotSpec, draw_eval_plot, draw_plot,
                                           human_count)

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.yaml"
REQUIRED_KEYS = ("step", "tokens")

METRIC_LABELS = {
    "train/loss": "train loss",
    "train/masked_accuracy": "train masked accuracy",
    "train/perplexity": "train perplexity",
    "lr": "learning rate",
    "throughput/tokens_per_s": "tokens/s",
    "throughput/mfu": "MFU",
    "batch_size": "batch size (sequences)",
    "eval/loss": "eval loss",
    "eval/masked_accuracy": "eval masked accuracy",
    "eval/perplexity": "eval perplexity",
}

# Leaf names of config keys worth a line in the summary, wherever the recipe nests them.
CONFIG_HIGHLIGHTS = (
    "run_name", "save_folder", "max_duration", "precision", "seed", "compile", "manifest", "tokenizer",
    "max_seq_len", "micro_batch_size", "global_batch_size", "start_batch_size", "mlm_probability", "preset",
    "init_from", "global_rope_theta", "local_rope_theta", "attn_backend", "hidden_size", "num_hidden_layers",
    "vocab_size", "lr", "betas", "weight_decay", "warmup", "decay", "decay_shape", "interval", "parallelism",
)


@dataclass
class Phase:
    """One run directory: its metric records (after resume clean-up) and where it sits on the stitched axis."""

    name: str
    run_dir: Path
    records: list[dict]
    config: dict | None
    notes: list[str] = field(default_factory=list)
    token_offset: int = 0

    @property
    def tokens_end(self) -> int:
        return int(max(r["tokens"] for r in self.records))

    @property
    def steps_end(self) -> int:
        return int(max(r["step"] for r in self.records))

    @property
    def time_end(self) -> float | None:
        times = [r["time_s"] for r in self.records if "time_s" in r]
        return max(times) if times else None

    def series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """(stitched tokens, values) of every record that carries `key`."""
        rows = [(r["tokens"], r[key]) for r in self.records if key in r]
        if not rows:
            return np.zeros(0), np.zeros(0)
        tokens, values = (np.asarray(col, dtype=np.float64) for col in zip(*rows))
        return tokens + self.token_offset, values

    def final(self, key: str) -> dict | None:
        """The last record that carries `key`."""
        for record in reversed(self.records):
            if key in record:
                return record
        return None


def _parse_record(path: Path, line_no: int, text: str) -> dict:
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{path}:{line_no}: not a JSON object ({err.msg} at column {err.colno})") from None
    if not isinstance(record, dict):
        raise UserError(f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}")
    for key in REQUIRED_KEYS:
        if key not in record:
            raise UserError(f"{path}:{line_no}: missing required key {key!r} (every line needs step and tokens)")
    for key, value in list(record.items()):
        if key in REQUIRED_KEYS or key in METRIC_LABELS or key == "time_s":
            if value is None and key in METRIC_LABELS:
                # The trainer writes NaN/inf (a diverged loss) as null: keep it as a gap, not a crash.
                record[key] = math.nan
            elif isinstance(value, bool) or not isinstance(value, (int, float)):
                raise UserError(f"{path}:{line_no}: {key!r} must be a number, got {value!r}")
    if "phase" in record and not isinstance(record["phase"], str):
        raise UserError(f"{path}:{line_no}: 'phase' must be a string, got {record['phase']!r}")
    return record


def read_metrics(path: Path) -> tuple[list[dict], list[str]]:
    """Records of one metrics.jsonl and notes about what was dropped.

    Two things are tolerated because they happen to healthy runs: an unfinished last line (the trainer is
    writing it right now), and steps going back (a run resumed from a checkpoint older than its last log
    line): the later records win and the superseded ones are dropped, so tokens never go backwards. Event
    records (spike-guard skips and rollbacks) are never dropped: every rollback stays in the report.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file (a run directory must hold {METRICS_FILE})")
    raw = path.read_text(encoding="utf-8")
    lines = raw.split("\n")
    records: list[dict] = []
    notes: list[str] = []
    resumes = 0
    for index, text in enumerate(lines):
        line_no = index + 1
        if not text.strip():
            continue
        is_unfinished_tail = index == len(lines) - 1 and not raw.endswith("\n")
        try:
            record = _parse_record(path, line_no, text)
        except UserError:
            if is_unfinished_tail:
                notes.append(f"{path}:{line_no}: unfinished last line skipped (still being written?)")
                continue
            raise
        if "event" not in record:
            last = next((r["step"] for r in reversed(records) if "event" not in r), None)
            if last is not None and record["step"] < last:
                resumes += 1
                records = [r for r in records if r["step"] < record["step"] or "event" in r]
        records.append(record)
    if resumes:
        notes.append(f"{path}: {resumes} resume(s) replayed steps already logged; the later lines were kept")
    if not records:
        raise UserError(f"{path}: no metric records yet")
    return records, notes


def _read_config(run_dir: Path) -> tuple[dict | None, list[str]]:
    import yaml

    path = run_dir / CONFIG_FILE
    if not path.is_file():
        return None, [f"{path}: missing, no config highlights for this phase"]
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise UserError(f"{path}{where}: not valid YAML ({getattr(err, 'problem', None) or err})") from None
    if not isinstance(config, dict):
        raise UserError(f"{path}: expected a mapping at the top level, got {type(config).__name__}")
    return config, []


def load_phase(run_dir: str | os.PathLike) -> Phase:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: not a run directory (expected a folder with {METRICS_FILE})")
    records, notes = read_metrics(run_dir / METRICS_FILE)
    config, config_notes = _read_config(run_dir)
    names = [r["phase"] for r in records if "phase" in r]
    name = names[-1] if names else run_dir.name
    return Phase(name=name, run_dir=run_dir, records=records, config=config, notes=notes + config_notes)


def stitch(phases: Sequence[Phase]) -> None:
    """Place each phase right after the previous one on the token axis."""
    offset = 0
    for phase in phases:
        phase.token_offset = offset
        offset += phase.tokens_end


def load_phases(run_dirs: Sequence[str | os.PathLike]) -> list[Phase]:
    if not run_dirs:
        raise UserError("give at least one run directory")
    phases = [load_phase(d) for d in run_dirs]
    stitch(phases)
    return phases


# ----------------------------------------------------------------------------------------------- formatting

def human_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "n/a"
    seconds = int(round(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours:02d}h {minutes:02d}m"
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {secs:02d}s"


def format_metric(key: str, value: float) -> str:
    if not math.isfinite(value):
        return str(value)
    if key.endswith("masked_accuracy") or key == "throughput/mfu":
        return f"{100 * value:.2f}%"
    if key == "lr":
        return f"{value:.3g}"
    if key in ("throughput/tokens_per_s", "batch_size"):
        return human_count(value)
    return f"{value:.4f}"


# ----------------------------------------------------------------------------------------------- summary

def _flatten(config: dict, prefix: str = "") -> dict[str, object]:
    flat: dict[str, object] = {}
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and str(key) != "parallelism":
            flat.update(_flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def config_highlights(config: dict | None) -> list[tuple[str, str]]:
    if not config:
        return []
    rows = []
    for dotted, value in _flatten(config).items():
        if dotted.rsplit(".", 1)[-1] in CONFIG_HIGHLIGHTS and value is not None:
            text = json.dumps(value) if isinstance(value, (dict, list)) else str(value)
            rows.append((dotted, text))
    return rows


@dataclass
class _Doc:
    """The summary as blocks, rendered twice (markdown and HTML) so the two never disagree."""

    blocks: list[tuple[str, object]] = field(default_factory=list)

    def heading(self, text: str, level: int = 2) -> None:
        self.blocks.append(("heading", (level, text)))

    def para(self, text: str) -> None:
        self.blocks.append(("para", text))

    def table(self, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
        self.blocks.append(("table", (list(header), [list(r) for r in rows])))

    def bullets(self, items: Sequence[str]) -> None:
        self.blocks.append(("bullets", list(items)))

    def image(self, file_name: str, alt: str) -> None:
        self.blocks.append(("image", (file_name, alt)))

    def markdown(self) -> str:
        out: list[str] = []
        for kind, data in self.blocks:
            if kind == "heading":
                level, text = data
                out.append("#" * level + " " + text)
            elif kind == "para":
                out.append(data)
            elif kind == "table":
                header, rows = data
                cell = lambda s: str(s).replace("|", "\\|")  # noqa: E731 - one-line escaper
                out.append("| " + " | ".join(map(cell, header)) + " |")
                out.append("|" + "---|" * len(header))
                out.extend("| " + " | ".join(map(cell, row)) + " |" for row in rows)
            elif kind == "bullets":
                out.append("\n".join(f"- {item}" for item in data))
            elif kind == "image":
                file_name, alt = data
                out.append(f"[![{alt}]({file_name})]({file_name})")
            out.append("")
        return "\n".join(out)

    def html(self, title: str) -> str:
        esc = html.escape
        out = [f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{esc(title)}</title>",
               "<style>body{font-family:sans-serif;max-width:1150px;margin:2em auto;padding:0 1em}"
               "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
               "text-align:left}th{background:#f3f3f3}img{max-width:100%}</style></head><body>"]
        for kind, data in self.blocks:
            if kind == "heading":
                level, text = data
                out.append(f"<h{level}>{esc(text)}</h{level}>")
            elif kind == "para":
                out.append(f"<p>{esc(data)}</p>")
            elif kind == "table":
                header, rows = data
                out.append("<table><tr>" + "".join(f"<th>{esc(str(h))}</th>" for h in header) + "</tr>")
                out.extend("<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in row) + "</tr>" for row in rows)
                out.append("</table>")
            elif kind == "bullets":
                out.append("<ul>" + "".join(f"<li>{esc(item)}</li>" for item in data) + "</ul>")
            elif kind == "image":
                file_name, alt = data
                out.append(f"<p><a href='{esc(file_name)}'><img src='{esc(file_name)}' alt='{esc(alt)}'></a></p>")
        out.append("</body></html>\n")
        return "\n".join(out)


def _final_text(phase: Phase, key: str) -> str:
    record = phase.final(key)
    return format_metric(key, float(record[key])) if record else "-"


def _median_text(phase: Phase, key: str) -> str:
    """Median over the phase: a single step's throughput swings with eval and checkpoint pauses."""
    values = phase.series(key)[1]
    values = values[np.isfinite(values)]
    return format_metric(key, float(np.median(values))) if len(values) else "-"


def spike_guard_rows(phases: Sequence[Phase]) -> list[list[str]]:
    """One row per spike-guard action: skipped spikes and rollbacks."""
    rows = []
    for phase in phases:
        for record in phase.records:
            event = record.get("event")
            if event == "spike_skipped":
                loss, norm = record.get("spike/loss"), record.get("spike/grad_norm")
                rule = f"{record['rule']} rule: " if record.get("rule") else ""
                details = (f"{rule}loss {_number(loss)} (limit {_number(record.get('spike/loss_limit'))}), grad norm "
                           f"{_number(norm)} (limit {_number(record.get('spike/grad_norm_limit'))})")
                rows.append([phase.name, f"{record['step']:,}", "update skipped", details])
            elif event == "rollback":
                number = f" {record['rollback']}" if "rollback" in record else ""
                start = f"step {record['step']:,}" if record["step"] else "the initial weights"
                window = record.get("skipped_loader_steps")
                skipped = (f"loader steps {window[0]:,}-{window[1]:,}" if window
                           else f"the data of {record.get('skipped_steps')} steps")
                details = (f"after spikes at steps {', '.join(map(str, record.get('spike_steps', [])))}: restarted "
                           f"from {start}, skipped {skipped}, lr x {record.get('lr_scale')}")
                if record.get("reason"):
                    details += f" ({record['reason']})"
                rows.append([phase.name, f"{record['step']:,}", f"rollback{number}", details])
    return rows


def _number(value) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def build_summary(phases: Sequence[Phase], plots: Sequence[tuple[PlotSpec, Path]], notes: Sequence[str]) -> _Doc:
    doc = _Doc()
    chain = " → ".join(p.name for p in phases)
    doc.heading(f"Training report: {chain}", 1)
    doc.para(f"Generated {datetime.now().strftime('%Y-%m-%d %H:%M')} from "
             + ", ".join(str(p.run_dir) for p in phases) + ".")
    total_tokens = sum(p.tokens_end for p in phases)
    times = [p.time_end for p in phases]
    total_time = sum(t for t in times if t is not None) if any(t is not None for t in times) else None
    doc.para(f"Total: {human_count(total_tokens)} tokens ({total_tokens:,}), "
             f"{sum(p.steps_end for p in phases):,} optimizer steps, wall time {human_duration(total_time)}.")

    doc.heading("Phases")
    doc.table(
        ["phase", "run dir", "steps", "tokens", "stitched tokens", "wall time", "train loss", "eval loss",
         "eval masked acc.", "median tokens/s", "median MFU"],
        [[p.name, str(p.run_dir), f"{p.steps_end:,}", human_count(p.tokens_end),
          f"{human_count(p.token_offset)} – {human_count(p.token_offset + p.tokens_end)}",
          human_duration(p.time_end), _final_text(p, "train/loss"), _final_text(p, "eval/loss"),
          _final_text(p, "eval/masked_accuracy"), _median_text(p, "throughput/tokens_per_s"),
          _median_text(p, "throughput/mfu")] for p in phases])

    events = spike_guard_rows(phases)
    if events:
        doc.heading("Loss-spike guard")
        doc.para("Steps whose update the guard skipped, and rollbacks to an earlier checkpoint (metrics.jsonl "
                 "lines with an \"event\" key).")
        doc.table(["phase", "step", "action", "details"], events)

    last = phases[-1]
    doc.heading(f"Final metrics ({last.name})")
    rows = []
    for key, label in METRIC_LABELS.items():
        record = last.final(key)
        if record is not None:
            rows.append([label, format_metric(key, float(record[key])), f"{record['step']:,}",
                         human_count(record["tokens"])])
    if rows:
        doc.table(["metric", "value", "at step", "at tokens"], rows)
    else:
        doc.para("No optional metrics were logged.")

    doc.heading("Config highlights")
    for phase in phases:
        highlights = config_highlights(phase.config)
        doc.heading(phase.name, 3)
        if highlights:
            doc.table(["key", "value"], highlights)
        elif phase.config is None:
            doc.para(f"No {CONFIG_FILE} in {phase.run_dir}.")
        else:
            doc.para(f"None of the usual keys found; see {phase.run_dir / CONFIG_FILE}.")

    doc.heading("Plots")
    if plots:
        for spec, path in plots:
            doc.image(path.name, spec.title)
    else:
        doc.para("No plots: none of the plotted metrics was logged.")
    if notes:
        doc.heading("Notes")
        doc.bullets(notes)
    return doc


def _add_heldout_sets(doc: _Doc, phases: Sequence[Phase], out_dir: Path) -> None:
    """Several held-out sets (eval.manifests, e.g. domain and general): their MLM losses on one plot and the
    change of each from its first to its last evaluation, so forgetting shows next to adaptation."""
    keys = sorted({k for p in phases for r in p.records for k in r if re.fullmatch(r"eval_[\w-]+/loss", k)})
    if not keys:
        return
    doc.heading("Held-out sets")
    # eval.manifest's set (eval/loss) joins as "eval"; eval_NAME/loss is labelled NAME.
    series = tuple((k, k.split("/")[0].removeprefix("eval_")) for k in (["eval/loss"] if any(
        p.final("eval/loss") for p in phases) else []) + keys)
    spec = PlotSpec("heldout.png", "Held-out MLM loss per set", (("cross-entropy", series),))
    path, _ = draw_plot(spec, phases, out_dir)
    rows = []
    for key, label in series:
        values = [(p.name, r) for p in phases for r in p.records if key in r]
        first, last = values[0][1], values[-1][1]
        rows.append([label, f"{first[key]:.4f}", f"{last[key]:.4f}", f"{last[key] - first[key]:+.4f}",
                     human_count(last["tokens"])])
    doc.table(["held-out set", "first eval loss", "last eval loss", "change", "at tokens"], rows)
    if path is not None:
        doc.image(path.name, spec.title)


LIVE_EVAL_PREFIX = "live_eval/"  # written by modernbert_train.eval.live.LiveEvaluation


def _add_evaluation(doc: _Doc, phases: Sequence[Phase], eval_dirs: Sequence[str | os.PathLike],
                    out_dir: Path) -> None:
    """Downstream scores: the live-evaluation curve (metrics.jsonl), and per `modernbert-train eval` folder a
    table and a grouped-bar plot."""
    live_keys = sorted({k for p in phases for r in p.records for k in r if k.startswith(LIVE_EVAL_PREFIX)})
    if not live_keys and not eval_dirs:
        return
    doc.heading("Downstream evaluation")
    if live_keys:
        spec = PlotSpec("live_eval.png", "Evaluation suite during training",
                        (("score", tuple((k, k[len(LIVE_EVAL_PREFIX):]) for k in live_keys)),))
        path, _ = draw_plot(spec, phases, out_dir)
        rows = [[k[len(LIVE_EVAL_PREFIX):], f"{rec[k]:.4g}", f"{rec['step']:,}"]
                for k in live_keys if (rec := phases[-1].final(k)) is not None]
        if rows:
            doc.table(["task/metric (live)", f"last value ({phases[-1].name})", "at step"], rows)
        if path is not None:
            doc.image(path.name, spec.title)
    for number, eval_dir in enumerate(eval_dirs, start=1):
        from modernbert_train.eval.runner import table_rows

        results_file = Path(eval_dir) / "results.json"
        results = _read_results(eval_dir, results_file)
        doc.para(f"Suite `{results['suite']}` ({results_file}): mean +- std over seeds, grid point chosen on dev.")
        doc.table(*table_rows(results["summary"]))
        # One PNG per --eval folder: eval.png, then eval_2.png, ...
        file_name = EVAL_PLOT_FILE if number == 1 else EVAL_PLOT_FILE.replace(".", f"_{number}.", 1)
        title = f"Downstream evaluation: {results.get('suite_name') or results['suite']}"
        path = draw_eval_plot(results["summary"], title, out_dir / file_name)
        if path is not None:
            doc.image(path.name, title)
        else:
            doc.para(f"No evaluation plot for {results_file}: none of its metrics is a number.")


def _read_results(eval_dir, results_file: Path) -> dict:
    if not results_file.exists():
        raise UserError(f"--eval {eval_dir}: no results.json (write one with `modernbert-train eval`)")
    try:
        results = json.loads(results_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"{results_file}:{err.lineno}: not valid JSON ({err.msg})") from None
    if not isinstance(results, dict) or not isinstance(results.get("summary"), list) or "suite" not in results:
        raise UserError(f"{results_file}: expected the object `modernbert-train eval` writes, with 'suite' and "
                        f"a 'summary' list")
    return results


def write_report(run_dirs: Sequence[str | os.PathLike], out_dir: str | os.PathLike,
                 eval_dirs: Sequence[str | os.PathLike] = ()) -> Path:
    """Plots and summary of the given run directories (in phase order) and of evaluation results folders;
    returns the path of report.md."""
    from modernbert_train.common.progress import Progress

    out_dir = Path(out_dir)
    with Progress("report", len(run_dirs) + len(PLOTS) + 1, "step") as bar:
        phases = []
        for run_dir in run_dirs:
            phases.append(load_phase(run_dir))
            bar.update()
        if not phases:
            raise UserError("give at least one run directory")
        stitch(phases)
        out_dir.mkdir(parents=True, exist_ok=True)
        notes = [note for phase in phases for note in phase.notes]
        plots = []
        for spec in PLOTS:
            path, plot_notes = draw_plot(spec, phases, out_dir)
            notes.extend(plot_notes)
            if path is not None:
                plots.append((spec, path))
            bar.update()
        doc = build_summary(phases, plots, notes)
        _add_heldout_sets(doc, phases, out_dir)
        _add_evaluation(doc, phases, eval_dirs, out_dir)
        markdown_path = out_dir / "report.md"
        markdown_path.write_text(doc.markdown(), encoding="utf-8")
        (out_dir / "report.html").write_text(doc.html(f"Training report: {phases[-1].name}"), encoding="utf-8")
        bar.update()
    return markdown_path
