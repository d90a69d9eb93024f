"""BenchResult: the rows of a run (one per target and load level, vLLM's column names),
with the configuration and machine it was measured on; saved and loaded as JSON."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

# The columns of the summary table, in order.
TABLE_COLUMNS = ("target", "load", "completed", "errors", "request_throughput", "output_throughput",
                 "total_token_throughput", "mean_ttft_ms", "p50_ttft_ms", "p99_ttft_ms", "mean_tpot_ms",
                 "mean_itl_ms", "p99_itl_ms", "mean_e2el_ms", "p99_e2el_ms",
                 "spec_acceptance_rate", "spec_mean_accepted_length")  # the last two: speculating targets only


def _clean(value: Any) -> Any:
    """JSON has no NaN: store None."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


@dataclass
class BenchResult:
    config: dict[str, Any]
    machine: dict[str, Any]
    rows: list[dict[str, Any]]
    runs: list[dict[str, Any]] = field(default_factory=list)  # every repeat, before the medians
    samples: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # "target|load" -> ttft/itl ms
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def to_pandas(self):
        import pandas as pd

        return pd.DataFrame(self.rows)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(_clean(asdict(self)), indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> BenchResult:
        data = json.loads(Path(path).read_text())
        nan = float("nan")
        data["rows"] = [{k: (nan if v is None and k not in ("error_examples",) else v) for k, v in row.items()}
                        for row in data["rows"]]
        return cls(**data)

    def table(self) -> dict[str, str]:
        from jupyter_llm.bench.machine import machine_line
        from jupyter_llm.views import table_bundle

        rows = [{c: _format(c, row.get(c)) for c in TABLE_COLUMNS} for row in self.rows]
        return table_bundle(rows, TABLE_COLUMNS, title=f"Benchmark ({self.config.get('repeat', 1)} repeat(s), medians) "
                                                       f"on {machine_line(self.machine)}")

    def plot(self, compare: BenchResult | None = None):
        """A matplotlib Figure: throughput vs load, TTFT percentiles vs load, ITL distribution."""
        from jupyter_llm.bench.charts import plot_result

        return plot_result(self, compare)

    def _repr_mimebundle_(self, include=None, exclude=None) -> dict[str, str]:
        return self.table()


def _format(column: str, value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        return f"{value:g}" if column in ("completed", "errors") else f"{value:.2f}"
    return value
