"""The benchmark: metrics exact on synthetic timelines, workloads, results, the runner on a
real backend, a failing target reported as errors, and the magic."""
from __future__ import annotations

import json
import math

import pytest

from jupyter_llm.bench import (
    BackendTarget,
    BenchResult,
    HTTPTarget,
    RequestRecord,
    from_file,
    from_prompts,
    parse_length,
    run_benchmark,
    synthetic,
)
from jupyter_llm.bench.metrics import compute_metrics, percentile
from jupyter_llm.errors import ParamError
from manager_helpers import load_keeping_default


def test_metrics_are_exact_on_synthetic_timelines():
    a = RequestRecord(token_times=[0.1, 0.2, 0.4], end=0.5, prompt_tokens=10, output_tokens=3)
    b = RequestRecord(token_times=[0.3, 0.6], end=0.6, prompt_tokens=20, output_tokens=2)
    failed = RequestRecord(end=0.2, error="boom")
    m = compute_metrics([a, b, failed], duration=2.0)
    assert (m["completed"], m["errors"], m["error_examples"]) == (2, 1, ["boom"])
    assert m["request_throughput"] == 1.0 and m["output_throughput"] == 2.5 and m["total_token_throughput"] == 17.5
    assert m["mean_ttft_ms"] == pytest.approx(200) and m["median_ttft_ms"] == pytest.approx(200)
    assert m["p99_ttft_ms"] == pytest.approx(100 + 200 * 0.99)
    # ITL pooled: 100, 200 (a) and 300 (b)
    assert m["mean_itl_ms"] == pytest.approx(200) and m["p50_itl_ms"] == pytest.approx(200)
    # TPOT: a (0.5 - 0.1) / 2 = 200 ms, b (0.6 - 0.3) / 1 = 300 ms
    assert m["mean_tpot_ms"] == pytest.approx(250)
    assert m["mean_e2el_ms"] == pytest.approx(550) and m["p90_e2el_ms"] == pytest.approx(590)


def test_percentile_matches_numpy():
    import numpy as np

    values = [5.0, 1.0, 9.0, 3.0, 7.0, 2.0]
    for q in (0, 50, 90, 99, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
    assert math.isnan(percentile([], 50))


def test_workloads(tmp_path):
    assert parse_length("64") == 64 and parse_length("32-512") == (32, 512)
    for bad in ("0", "9-3", "x"):
        with pytest.raises(ParamError, match="positive integer N or a range A-B"):
            parse_length(bad)
    w = synthetic(20, (32, 512), (16, 256), seed=1)
    assert len(w) == 20 and all(16 <= r.max_tokens <= 256 and r.ignore_eos for r in w.requests)
    assert all(32 <= len(r.prompt.split()) <= 512 for r in w.requests)
    def prompts():
        return [r.prompt for r in synthetic(5, 8, 4, seed=1).requests]

    assert prompts() == prompts()
    assert synthetic(3, 8, 4, chat=True).requests[0].messages[0]["role"] == "user"
    assert from_prompts(["a", [{"role": "user", "content": "b"}]], 5).requests[1].messages is not None
    (tmp_path / "p.txt").write_text("one\n\ntwo\n")
    assert [r.prompt for r in from_file(tmp_path / "p.txt").requests] == ["one", "two"]
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "x", "max_tokens": 7}) + "\n"
                                      + json.dumps({"messages": [{"role": "user", "content": "y"}]}) + "\n")
    loaded = from_file(tmp_path / "p.jsonl").requests
    assert loaded[0].max_tokens == 7 and loaded[1].messages
    (tmp_path / "bad.jsonl").write_text("{nope\n")
    with pytest.raises(ParamError, match="bad.jsonl:1: not JSON"):
        from_file(tmp_path / "bad.jsonl")


def test_runner_on_real_backends_and_a_failing_target(manager, tiny_hf, tmp_path):
    dead = HTTPTarget("http://127.0.0.1:9/v1", model="x", timeout=2)  # port 9: nothing listens
    result = run_benchmark([BackendTarget(manager, tiny_hf), dead], synthetic(6, (4, 12), (3, 6), seed=2),
                           concurrency=[1, 3], repeat=2, warmup=1, progress=False)
    df = result.to_pandas()
    assert list(df["load"]) == ["c=1", "c=1", "c=3", "c=3"] and set(df["target"]) == {tiny_hf, dead.label}
    ours = df[df["target"] == tiny_hf]
    assert (ours["completed"] == 6).all() and (ours["errors"] == 0).all() and (ours["repeats"] == 2).all()
    assert (ours["output_throughput"] > 0).all() and (ours["p99_ttft_ms"] >= ours["p50_ttft_ms"]).all()
    expected_tokens = sum(r.max_tokens for r in synthetic(6, (4, 12), (3, 6), seed=2).requests)
    assert ours["total_output_tokens"].iloc[0] == expected_tokens
    theirs = df[df["target"] == dead.label]
    assert (theirs["errors"] == 6).all() and (theirs["completed"] == 0).all()
    assert "ConnectError" in theirs["error_examples"].iloc[0][0]
    assert len(result.runs) == 8 and result.machine["cores"] >= 1

    path = result.save(tmp_path / "run.json")
    again = BenchResult.load(path)
    assert again.rows[0]["output_throughput"] == result.rows[0]["output_throughput"]
    assert math.isnan(again.rows[-1]["mean_ttft_ms"]) and again.config["concurrency"] == [1, 3]
    from jupyter_llm.bench.charts import figure_png

    fig = result.plot(compare=again)
    assert len(fig.axes) == 3 and figure_png(fig)[:8] == b"\x89PNG\r\n\x1a\n"
    assert "output_throughput" in result.table()["text/plain"]

    # The saved run names its machine: CPU, instruction sets, torch build and threads.
    from jupyter_llm.cpu import cpu_info

    machine = again.machine
    assert machine["cpu"] == cpu_info().model and machine["cpu_fingerprint"] == cpu_info().fingerprint
    assert set(machine["isa"]) == {"avx2", "avx512", "avx512_bf16", "vnni", "amx"}
    assert machine["isa"]["avx2"] == cpu_info().has("avx2")
    assert machine["torch"]["version"].startswith("2.") and machine["torch"]["threads"] >= 1
    assert machine["torch"]["cpu_capability"] in ("DEFAULT", "NO AVX", "AVX2", "AVX512", "VSX", "Z VECTOR", "SVE256")
    assert cpu_info().model in result.table()["text/plain"]
    def labels(figure):
        return [line.get_label() for line in figure.axes[0].lines]

    assert any(label.endswith("(earlier)") for label in labels(fig))
    other = BenchResult.load(path)
    other.machine = {**other.machine, "cpu": "Intel(R) Xeon(R) Platinum 8481C", "cpu_fingerprint": "another"}
    assert any("(earlier, other CPU: Intel(R) Xeon(R) Platinum 8481C)" in label
               for label in labels(result.plot(compare=other)))


def test_speculating_targets_report_acceptance(manager, tiny_llama, tiny_hf):
    from jupyter_llm.bench.measure import speculation_metrics

    assert speculation_metrics(None, None) == {}
    assert speculation_metrics({"spec_num_drafts": 2, "spec_num_draft_tokens": 10, "spec_num_accepted_tokens": 4},
                               {"spec_num_drafts": 6, "spec_num_draft_tokens": 30, "spec_num_accepted_tokens": 16}) \
        == {"spec_acceptance_rate": 0.6, "spec_mean_accepted_length": 4.0}
    load_keeping_default(manager, "native", str(tiny_llama), name="bench-spec", progress=False,
                         kv_cache_memory="8MiB", speculative="ngram")
    try:
        workload = synthetic(4, 12, 16, seed=1)
        result = run_benchmark([BackendTarget(manager, "bench-spec"), BackendTarget(manager, tiny_hf)], workload,
                               concurrency=[2], progress=False)
        spec, plain = result.rows
        extra = manager.info("bench-spec").extra
        assert 0 <= spec["spec_acceptance_rate"] <= 1 and spec["spec_mean_accepted_length"] >= 1
        assert "spec_acceptance_rate" not in plain
        assert extra["spec_num_drafts"] > 0
        table = result.table()["text/plain"]
        assert "spec_acceptance_rate" in table
    finally:
        manager.unload("bench-spec")


def test_request_rate_open_loop(manager, tiny_hf):
    result = run_benchmark([BackendTarget(manager, tiny_hf)], synthetic(5, 4, 3), request_rate=50.0, progress=False)
    [row] = result.rows
    assert row["load"] == "50 req/s" and row["completed"] == 5


def test_llm_bench_magic(shell, tiny_hf, tmp_path, capsys):
    from IPython.core.error import UsageError

    save = tmp_path / "bench.json"
    shell.run_cell(f"%llm_bench --backends {tiny_hf} --num-prompts 3 --prompt-len 4 --max-tokens 3 "
                   f"--concurrency 1,2 --save {save} -o res")
    res = shell.user_ns["res"]
    assert isinstance(res, BenchResult) and len(res.rows) == 2
    assert save.is_file() and save.with_suffix(".png").is_file()
    shell.run_cell("prompts = ['hello there', 'once upon']")
    shell.run_cell(f"%llm_bench --backends {tiny_hf} --prompts prompts --max-tokens 2 --concurrency 2 "
                   f"--no-plot --compare {save} -o res2")
    assert shell.user_ns["res2"].config["workload"]["kind"] == "prompts"
    with pytest.raises(UsageError, match="--concurrency takes positive integers"):
        shell.run_cell(f"%llm_bench --backends {tiny_hf} --concurrency 0")
    with pytest.raises(UsageError, match="no backend named 'nope'"):
        shell.run_cell("%llm_bench --backends nope")
