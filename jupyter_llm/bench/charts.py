"""Charts of a benchmark run as real images (PNG through matplotlib's Agg backend), so they
render in JupyterLab, in nbconvert HTML and on GitHub."""
from __future__ import annotations

import io
import textwrap
from typing import TYPE_CHECKING

from jupyter_llm.bench.machine import same_cpu

if TYPE_CHECKING:
    from jupyter_llm.bench.result import BenchResult


def _series(result: BenchResult, metric: str) -> dict[str, tuple[list[float], list[float], list[str]]]:
    """target -> (load values, metric values, load labels), in load order."""
    out: dict[str, tuple[list[float], list[float], list[str]]] = {}
    for row in sorted(result.rows, key=lambda r: (r["target"], r["load_value"])):
        xs, ys, labels = out.setdefault(row["target"], ([], [], []))
        xs.append(row["load_value"])
        ys.append(row.get(metric, float("nan")))
        labels.append(row["load"])
    return out


def plot_result(result: BenchResult, compare: BenchResult | None = None):
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    fig = Figure(figsize=(13, 4), layout="constrained")
    ax_tp, ax_ttft, ax_itl = fig.subplots(1, 3)
    kind = result.rows[0]["load_kind"] if result.rows else "concurrency"
    xlabel = "concurrency" if kind == "concurrency" else "request rate (req/s)"
    # An earlier run from another CPU is drawn as what it is, never as the same machine's figure.
    earlier = " (earlier)" if compare is None or same_cpu(result.machine, compare.machine) else \
        f" (earlier, other CPU: {compare.machine.get('cpu', '?')})"
    runs = [(result, "", "-")] + ([(compare, earlier, "--")] if compare is not None else [])
    colors: dict[str, str] = {}  # one colour per target, shared by the earlier run
    for run, suffix, style in runs:
        for target, (xs, ys, _) in _series(run, "output_throughput").items():
            color = colors.setdefault(target, f"C{len(colors)}")
            ax_tp.plot(xs, ys, style, marker="o", color=color, label=target + suffix)
        for target, (xs, ys, _) in _series(run, "p50_ttft_ms").items():
            color = colors.setdefault(target, f"C{len(colors)}")
            ax_ttft.plot(xs, ys, style, marker="o", color=color, label=f"{target}{suffix} p50")
            _, p99, _ = _series(run, "p99_ttft_ms")[target]
            ax_ttft.plot(xs, p99, ":", marker="^", color=color, label=f"{target}{suffix} p99")
    for ax, title, ylabel in ((ax_tp, "Output throughput", "tokens/s"), (ax_ttft, "Time to first token", "ms")):
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if kind == "concurrency":
            levels = sorted({row["load_value"] for row in result.rows})
            ax.set_xscale("log", base=2)
            ax.set_xticks(levels, [f"{v:g}" for v in levels])
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    # ITL distribution of each target at its highest load
    top = {}
    for key in result.samples:
        target, _load = key.split("|", 1)
        top[target] = key  # rows are in load order, so the last key wins
    labels = ["\n".join(textwrap.wrap(target, 14) + [key.split("|", 1)[1]]) for target, key in top.items()]
    data = [result.samples[k]["itl_ms"] or [float("nan")] for k in top.values()]
    if data:
        ax_itl.boxplot(data, tick_labels=labels, showfliers=False)
        ax_itl.tick_params(axis="x", labelsize=8)
    ax_itl.set_title("Inter-token latency")
    ax_itl.set_ylabel("ms")
    ax_itl.grid(alpha=0.3)
    return fig


def figure_png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()
