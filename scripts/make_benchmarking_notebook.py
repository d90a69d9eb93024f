"""Writes notebooks/03-benchmarking.ipynb (kept as a script so the notebook's source is reviewable)."""
import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

cells = [
    new_markdown_cell(
        "# Benchmarking backends and servers\n\n`%llm_bench` runs one workload against several targets "
        "(loaded backends and OpenAI-compatible URLs) at several load levels and reports vLLM's serving "
        "metrics: TTFT, inter-token latency, time per output token, end-to-end latency and throughput. "
        "At each level the targets run one after the other, so noise on a shared machine hits them alike; "
        "`--repeat N` repeats the sweep and reports medians.\n\nThe settings here are short so that the "
        "notebook runs in CI on 2 CPU cores; raise `--num-prompts`, `--max-tokens` and `--repeat` for "
        "numbers you want to trust."),
    new_code_cell("%load_ext jupyter_llm"),
    new_markdown_cell("Three in-process backends on the embedded SmolLM2-135M-Instruct: our own engine "
                      "(`native`: continuous batching), transformers (`hf`: static batches) and "
                      "llama.cpp (`llamacpp`: one sequence at a time)."),
    new_code_cell("%llm_backend native\n%llm_backend hf\n%llm_backend llamacpp"),
    new_markdown_cell(
        "And a real third-party server: **llama-cpp-python's server** (`python -m llama_cpp.server`) on the "
        "same GGUF file. Note that it serves one request at a time (unlike llama.cpp's own C++ server, which "
        "batches), and by default it aborts a running request when another arrives, so we start it with "
        "`--interrupt_requests False`."),
    new_code_cell(
        "import socket, subprocess, sys, time, httpx\n"
        "from jupyter_llm.model_files import embedded_gguf_path\n\n"
        "with socket.socket() as s:\n    s.bind(('127.0.0.1', 0))\n    port = s.getsockname()[1]\n"
        "server = subprocess.Popen([sys.executable, '-m', 'llama_cpp.server', '--model', str(embedded_gguf_path()),\n"
        "                           '--host', '127.0.0.1', '--port', str(port), '--n_threads', '2',\n"
        "                           '--interrupt_requests', 'False'],\n"
        "                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
        "llamacpp_url = f'http://127.0.0.1:{port}/v1'\n"
        "for _ in range(300):\n    try:\n"
        "        if httpx.get(llamacpp_url + '/models', timeout=1).status_code == 200:\n"
        "            break\n    except httpx.HTTPError:\n        time.sleep(0.2)\n"
        "print('llama-cpp-python server at', llamacpp_url)"),
    new_markdown_cell("## One run, four targets, two concurrencies\n\nA synthetic workload: 8 prompts of "
                      "about 32 tokens, 16 output tokens each (enforced with `ignore_eos`), greedy."),
    new_code_cell(
        "%llm_bench --backends native,hf,llamacpp --url \"llama-cpp-python server={llamacpp_url}\" "
        "--num-prompts 8 --prompt-len 32 --max-tokens 16 --concurrency 1,4 --save build/bench-run1.json -o run1"
        .replace("{llamacpp_url}", "$llamacpp_url")),
    new_markdown_cell("`-o` keeps a `BenchResult`: `.to_pandas()` has one row per target and level, with "
                      "vLLM's column names."),
    new_code_cell("run1.to_pandas()[['target', 'load', 'completed', 'output_throughput', 'mean_ttft_ms', "
                  "'p99_ttft_ms', 'mean_itl_ms', 'mean_e2el_ms']]"),
    new_markdown_cell("## Compare with an earlier run\n\nSaved runs keep the configuration and the machine "
                      "they were measured on; `--compare FILE` overlays one (dashed) on the charts."),
    new_code_cell("run1.machine['cpu'], run1.machine['cores'], run1.config['workload']"),
    new_code_cell("%llm_bench --backends native,hf --num-prompts 8 --prompt-len 32 --max-tokens 16 "
                  "--concurrency 1,4 --compare build/bench-run1.json -o run2"),
    new_markdown_cell("## Open loop\n\n`--request-rate R` sends requests as a Poisson process at R per "
                      "second, whether or not earlier ones have finished."),
    new_code_cell("%llm_bench --backends native --num-prompts 8 --prompt-len 16 --max-tokens 8 "
                  "--request-rate 4 --no-plot"),
    new_code_cell("server.terminate()\nserver.wait();"),
]
nb = new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                        "language": "python"}})
nbformat.write(nb, "notebooks/03-benchmarking.ipynb")
