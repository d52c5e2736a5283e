"""The report's PNGs: which metrics each plot draws (`PLOTS`), drawing one over a chain of phases, and the
evaluation's grouped bars (`eval_figure`: one group per task and metric, one bar per model).

Every series is drawn on the stitched token axis of `report.Phase`: a long phase is thinned to at most
MAX_POINTS_DRAWN points and noisy per-step curves get a moving average next to the raw line.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

# Phases are report.Phase objects; only their attributes are used here, so this module imports nothing of
# report.py (which imports it).
Phase = Any

# Every PNG has this exact size (no bbox_inches="tight", which would crop it to the content).
FIGURE_SIZE_INCHES = (11.0, 5.5)
FIGURE_DPI = 100
# Above this many points a line is thinned before drawing; a 1.7T-token phase logs ~400k steps.
MAX_POINTS_DRAWN = 4000


@dataclass(frozen=True)
class PlotSpec:
    """One PNG: panels stacked vertically, each a list of (metric key, legend label)."""

    file_name: str
    title: str
    panels: tuple[tuple[str, tuple[tuple[str, str], ...]], ...]  # (y label, series)
    percent_keys: frozenset[str] = frozenset()
    step_keys: frozenset[str] = frozenset()  # piecewise constant (batch size): drawn as steps
    count_keys: frozenset[str] = frozenset()  # large counts: axis labelled 240k, not 240000
    log_y: bool = False


PLOTS = (
    # Log scale: the first steps (~10.8 nats) would otherwise flatten the part of the curve that matters.
    PlotSpec("loss.png", "MLM loss", (("cross-entropy (log scale)", (("train/loss", "train"), ("eval/loss", "eval"))),),
             log_y=True),
    PlotSpec("lr.png", "Learning rate", (("learning rate", (("lr", "lr"),)),)),
    PlotSpec("throughput.png", "Throughput",
             (("tokens/s", (("throughput/tokens_per_s", "tokens/s"),)),
              ("MFU (%)", (("throughput/mfu", "MFU"),))),
             percent_keys=frozenset({"throughput/mfu"}), count_keys=frozenset({"throughput/tokens_per_s"})),
    PlotSpec("batch_size.png", "Global batch size", (("sequences", (("batch_size", "batch size"),)),),
             step_keys=frozenset({"batch_size"})),
    PlotSpec("masked_accuracy.png", "Masked-token accuracy",
             (("accuracy (%)", (("train/masked_accuracy", "train"), ("eval/masked_accuracy", "eval"))),),
             percent_keys=frozenset({"train/masked_accuracy", "eval/masked_accuracy"})),
)


def human_count(value: float) -> str:
    """1234567 -> '1.23M'; tokens span 1e3 .. 1e12, so SI-ish suffixes read best."""
    value = float(value)
    for threshold, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= threshold:
            return f"{value / threshold:.3g}{suffix}"
    return f"{value:.4g}" if value != int(value) else str(int(value))


def _thin(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if len(x) <= MAX_POINTS_DRAWN:
        return x, y
    keep = np.linspace(0, len(x) - 1, MAX_POINTS_DRAWN).round().astype(np.int64)
    return x[keep], y[keep]


def _smooth(y: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average; noisy per-step curves need it to show a trend."""
    window = min(window, len(y))
    if window < 3:
        return y
    kernel = np.ones(window) / window
    padded = np.pad(y, (window // 2, window - 1 - window // 2), mode="edge")
    return np.convolve(padded, kernel, mode="valid")


def draw_plot(spec: PlotSpec, phases: Sequence[Phase], out_dir: Path) -> tuple[Path | None, list[str]]:
    """Draw one PNG; returns (path or None when no phase has any of its keys, notes about missing series)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    present = {key for _, series in spec.panels for key, _ in series
               if any(len(p.series(key)[0]) for p in phases)}
    all_keys = [key for _, series in spec.panels for key, _ in series]
    notes = [f"{spec.file_name}: no {key!r} in any metrics.jsonl" for key in all_keys if key not in present]
    if not present:
        return None, [f"{spec.file_name} skipped: none of {', '.join(all_keys)} was logged"]
    panels = [(ylabel, series) for ylabel, series in spec.panels if any(k in present for k, _ in series)]

    fig, axes = plt.subplots(len(panels), 1, figsize=FIGURE_SIZE_INCHES, dpi=FIGURE_DPI, sharex=True,
                             squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (ylabel, series) in zip(axes[:, 0], panels):
        for index, (key, label) in enumerate(series):
            if key not in present:
                continue
            color = colors[index % len(colors)]
            scale = 100.0 if key in spec.percent_keys else 1.0
            # One window for all phases (~1/80 of the whole chain) so short phases are smoothed alike.
            points = sum(len(p.series(key)[0]) for p in phases)
            window = points // 80
            # Eval points and short runs: markers, one style across all phases.
            with_markers = key.startswith("eval/") or points < 40
            legend: str | None = label  # one legend entry per series, not one per phase
            for phase in phases:
                x, y = phase.series(key)
                if not len(x):
                    continue
                y = y * scale
                if key in spec.step_keys:
                    ax.step(*_thin(x, y), where="post", color=color, label=legend)
                elif with_markers:
                    ax.plot(*_thin(x, y), color=color, marker="o", markersize=3.5, linewidth=1.2, label=legend)
                else:
                    ax.plot(*_thin(x, y), color=color, alpha=0.25, linewidth=0.8)
                    ax.plot(*_thin(x, _smooth(y, window)), color=color, linewidth=1.6, label=legend)
                legend = None
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if spec.log_y:
            ax.set_yscale("log")
            # Plain numbers (3, 4, 6) read better than 10^0.5 on a loss axis that spans one decade.
            plain = FuncFormatter(lambda v, _pos: f"{v:g}")
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(plain)
        elif any(key in spec.count_keys for key, _ in series):
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: human_count(v)))
        if any(key in spec.step_keys for key, _ in series):
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # sequences come in whole numbers
        handles, labels = ax.get_legend_handles_labels()
        if len(labels) > 1:
            ax.legend(loc="best", fontsize=9)
    for ax in axes[:, 0]:
        for phase in phases:
            if phase.token_offset > 0:
                ax.axvline(phase.token_offset, color="0.45", linestyle="--", linewidth=1)
    top = axes[0, 0]
    if len(phases) > 1:
        for phase in phases:
            top.annotate(phase.name, xy=(phase.token_offset, 1.0), xycoords=("data", "axes fraction"),
                         xytext=(4, -4), textcoords="offset points", va="top", fontsize=9, color="0.3")
    bottom = axes[-1, 0]
    bottom.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: human_count(v)))
    bottom.set_xlabel("tokens" + (" (phases stitched in order)" if len(phases) > 1 else ""))
    bottom.set_xlim(left=0)
    top.set_title(spec.title + (" - " + " → ".join(p.name for p in phases) if len(phases) > 1 else
                                f" - {phases[0].name}"))
    fig.tight_layout()
    path = out_dir / spec.file_name
    fig.savefig(path, dpi=FIGURE_DPI)
    plt.close(fig)
    return path, notes


# ----------------------------------------------------------------------------------------------- evaluation bars

EVAL_PLOT_FILE = "eval.png"
# Scores in [-1, 1] (accuracy, F1, Matthews, Pearson, nDCG...) share one axis; a metric with another scale
# (MLM loss) gets a panel of its own so it does not flatten the scores.
LOWER_IS_BETTER = frozenset({"loss"})


@dataclass(frozen=True)
class EvalBar:
    """One bar: a model's mean over seeds for one (task, metric); std None when there is nothing to spread."""

    task: str
    metric: str
    model: str
    mean: float
    std: float | None


def eval_tick_label(task: str, metric: str) -> str:
    return f"{task}: {metric}"


def _finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)


def eval_bars(summaries: Sequence[dict]) -> list[EvalBar]:
    """The bars of results.json's "summary" (TaskSummary dicts): non-numeric or NaN means are left out, and a
    single seed (or a missing std) draws no error bar."""
    bars = []
    for s in summaries:
        stds = s.get("metric_stds") or {}
        several_seeds = s.get("seeds", 2) > 1
        for metric, mean in (s.get("metric_means") or {}).items():
            if not _finite_number(mean):
                continue
            std = stds.get(metric)
            std = float(std) if several_seeds and _finite_number(std) else None
            bars.append(EvalBar(str(s["task"]), str(metric), str(s["model"]), float(mean), std))
    return bars


def _eval_panels(bars: Sequence[EvalBar]) -> list[tuple[str, list[tuple[str, str]]]]:
    """(y label, [(task, metric) groups]) per panel, groups in results order."""
    keys = list(dict.fromkeys((b.task, b.metric) for b in bars))
    off_scale = {b.metric for b in bars if b.metric in LOWER_IS_BETTER or abs(b.mean) > 1}
    panels = []
    scores = [k for k in keys if k[1] not in off_scale]
    if scores:
        panels.append(("score (mean ± std over seeds)", scores))
    for metric in dict.fromkeys(k[1] for k in keys if k[1] in off_scale):
        lower = " (lower is better)" if metric in LOWER_IS_BETTER else ""
        panels.append((f"{metric}{lower}", [k for k in keys if k[1] == metric]))
    return panels


def eval_figure(summaries: Sequence[dict], title: str):
    """The grouped-bar figure of an evaluation's summary (one group per task and metric, one bar per model),
    or None when no metric is a number. The caller saves and closes it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = eval_bars(summaries)
    if not bars:
        return None
    models = list(dict.fromkeys(b.model for b in bars))
    by_key = {(b.task, b.metric, b.model): b for b in bars}
    panels = _eval_panels(bars)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axes = plt.subplots(1, len(panels), figsize=FIGURE_SIZE_INCHES, dpi=FIGURE_DPI, squeeze=False,
                             gridspec_kw={"width_ratios": [max(len(groups), 2) for _, groups in panels]})
    width = 0.8 / len(models)
    for ax, (ylabel, groups) in zip(axes[0], panels):
        for index, model in enumerate(models):
            drawn = [(g, by_key[(*key, model)]) for g, key in enumerate(groups) if (*key, model) in by_key]
            if not drawn:
                continue
            x = np.array([g for g, _ in drawn]) - 0.4 + width * (index + 0.5)
            means = [bar.mean for _, bar in drawn]
            ax.bar(x, means, width, color=colors[index % len(colors)], label=model)
            spread = [(xi, bar.mean, bar.std) for xi, (_, bar) in zip(x, drawn) if bar.std is not None]
            if spread:
                xs, ys, errs = zip(*spread)
                ax.errorbar(xs, ys, yerr=errs, fmt="none", ecolor="0.15", elinewidth=1, capsize=2.5)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([eval_tick_label(*key) for key in groups], rotation=35, ha="right",
                           rotation_mode="anchor", fontsize=8)
        ax.set_xlim(-0.6, len(groups) - 0.4)
        ax.set_ylabel(ylabel)
        ax.axhline(0, color="0.3", linewidth=0.8)
        ax.grid(True, axis="y", alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    if len(panels) > 1:  # a model may have bars in a later panel only
        for ax in axes[0, 1:]:
            for handle, label in zip(*ax.get_legend_handles_labels()):
                if label not in labels:
                    handles.append(handle)
                    labels.append(label)
    fig.suptitle(title, x=0.01, ha="left", fontsize=11)
    fig.legend(handles, labels, loc="upper right", ncol=min(len(labels), 4), fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    return fig


def draw_eval_plot(summaries: Sequence[dict], title: str, path: Path) -> Path | None:
    """Save `eval_figure` as a PNG of the report's fixed size; None when there was nothing numeric to draw."""
    import matplotlib.pyplot as plt

    fig = eval_figure(summaries, title)
    if fig is None:
        return None
    fig.savefig(path, dpi=FIGURE_DPI)
    plt.close(fig)
    return path
