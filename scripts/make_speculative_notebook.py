"""Writes notebooks/07-speculative-decoding.ipynb (kept as a script so the notebook's source is reviewable)."""
import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

cells = [
    new_markdown_cell(
        "# Speculative decoding\n\nA decode step of a small model on a CPU is bound by reading the weights, "
        "not by arithmetic, so checking five guessed tokens in one forward costs little more than computing "
        "one. The native engine guesses with **prompt lookup** (`--speculative ngram`: the continuation of the "
        "latest earlier occurrence of the last few tokens, free, and very good when the answer copies the "
        "prompt) or with a **draft model** (`--speculative draft`: a smaller model with the same tokenizer, or "
        "the target's own int8 copy with `--draft-quantization int8`). The target keeps the longest agreeing "
        "prefix plus one token of its own, so greedy output is exactly the same as without speculation, and "
        "sampling keeps the target's distribution (speculative sampling, Leviathan et al. 2023).\n\n"
        "Outputs are short here so the notebook runs in CI on 2 CPU cores; "
        "`python benchmarks/speculative_bench.py` measures it properly."),
    new_code_cell("%load_ext jupyter_llm"),
    new_markdown_cell("The embedded SmolLM2-135M-Instruct three times: plain, with prompt lookup, and with "
                      "its own int8 copy as the draft (vLLM's option names: `--num-speculative-tokens`, "
                      "`--prompt-lookup-min/max`; `speculative_config={...}` works from Python)."),
    new_code_cell("%llm_backend native --name plain --kv-cache-memory 256MiB\n"
                  "%llm_backend native --name ngram --kv-cache-memory 256MiB --speculative ngram\n"
                  "%llm_backend native --name self-draft --kv-cache-memory 256MiB --speculative draft "
                  "--draft-quantization int8"),
    new_markdown_cell("## A grounded task streams with prompt lookup\n\nFixing the typos of a given text: most "
                      "output tokens stand in the prompt already, and they arrive several at a time."),
    new_code_cell("%%generate --backend ngram --chat --temperature 0 --max-tokens 64\n"
                  "Rewrite this letter with every spelling mistake corrected:\n\n"
                  "Dear Mr Smith, thank you for you're letter of last week. We have recieved the documents "
                  "and will proces your aplication as soon as posible."),
    new_markdown_cell("## Tokens/s with and without, and how many guesses were accepted\n\nEach backend runs "
                      "the same greedy request; the table shows decode tokens/s, the speed-up over `plain`, "
                      "the acceptance rate of the guesses and the mean number of tokens each verification "
                      "emitted, and whether the output equals `plain`'s."),
    new_code_cell(
        "import pandas as pd\nimport jupyter_llm as jl\n\n"
        "manager = jl.get_manager()\n"
        "params = jl.SamplingParams(temperature=0, max_tokens=64)\n"
        "tasks = {\n"
        "    'summarise (grounded)': 'Summarise this paragraph in two sentences, reusing its wording:\\n\\n'\n"
        "        'The Industrial Revolution began in Britain in the late eighteenth century. "
        "It transformed economies '\n"
        "        'based on agriculture and handicrafts into economies based on large-scale industry, mechanized '\n"
        "        'manufacturing and the factory system.',\n"
        "    'story (open-ended)': 'Write a short story about a lighthouse keeper.',\n"
        "}\n\n"
        "def counters(name):\n"
        "    extra = manager.info(name).extra\n"
        "    return [extra.get(k, 0) for k in "
        "('spec_num_drafts', 'spec_num_draft_tokens', 'spec_num_accepted_tokens')]\n\n"
        "rows = []\n"
        "for task, prompt in tasks.items():\n"
        "    reference = None\n"
        "    for name in ('plain', 'ngram', 'self-draft'):\n"
        "        before = counters(name)\n"
        "        [c] = manager.generate(prompt, params, backend=name, chat=True)\n"
        "        drafts, proposed, accepted = (a - b for a, b in zip(counters(name), before))\n"
        "        speed = c.timings.decode_tokens_per_s\n"
        "        reference = reference or (c.token_ids, speed)\n"
        "        rows.append({'task': task, 'backend': name, 'decode tok/s': round(speed, 1),\n"
        "                     'speed-up': round(speed / reference[1], 2),\n"
        "                     'acceptance': round(accepted / proposed, 2) if proposed else None,\n"
        "                     'tokens per verification': round((accepted + drafts) / drafts, 2) if drafts else None,\n"
        "                     'same output as plain': c.token_ids == reference[0]})\n"
        "pd.DataFrame(rows)"),
    new_markdown_cell("The engine keeps running totals: `%llm_backend` shows the acceptance rate, the mean "
                      "accepted length and its measured speed-up (decode steps with guesses against steps "
                      "without), and a server started with `%llm_serve` exports them in `/metrics` under "
                      "vLLM's names (`jupyter_llm:spec_decode_num_accepted_tokens_total`, ...)."),
    new_code_cell("%llm_backend"),
    new_markdown_cell("Guessing backs off per sequence when its guesses keep failing (open-ended text gives "
                      "prompt lookup little to copy), and `--speculative-disable-by-batch-size N` turns it off "
                      "while more than N sequences run, where batching already keeps the CPU busy."),
]
nb = new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                        "language": "python"}})
nbformat.write(nb, "notebooks/07-speculative-decoding.ipynb")
