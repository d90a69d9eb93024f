"""Writes notebooks/01-quickstart.ipynb (kept as a script so the notebook's source is reviewable)."""
import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

cells = [
    new_markdown_cell("# jupyter-llm quickstart\n\nLoad a model, stream answers into cells, chat over several "
                      "turns, run a batch, play with sampling, look at log-probabilities, and keep the results "
                      "in variables. Everything runs locally on the embedded SmolLM2-135M-Instruct model: no "
                      "network, no GPU."),
    new_code_cell("%load_ext jupyter_llm"),
    new_markdown_cell("`%llm_backend hf` loads the embedded model on Hugging Face transformers. The first load "
                      "converts the GGUF file once into a cache (about 20 s); later loads take a few seconds."),
    new_code_cell("%llm_backend hf"),
    new_markdown_cell("## Generate\n\nThe cell body is the prompt. `--chat` applies the model's chat template; "
                      "`--temperature 0` is greedy decoding. Tokens stream into the output as they arrive."),
    new_code_cell("%%generate --chat --temperature 0 --max-tokens 16\nWhat is the capital of France?"),
    new_markdown_cell("## Chat over several turns\n\nPut the conversation in a variable and send it with "
                      "`{history}`; `-o VAR` keeps the answer as a list of `Completion`s."),
    new_code_cell('history = [\n    {"role": "system", "content": "You are a concise geography tutor."},\n'
                  '    {"role": "user", "content": "What is the capital of France?"},\n'
                  '    {"role": "assistant", "content": "The capital of France is Paris."},\n'
                  '    {"role": "user", "content": "And of Italy?"},\n]'),
    new_code_cell("%%generate --chat --temperature 0 --max-tokens 24 -o reply\n{history}"),
    new_code_cell('history.append({"role": "assistant", "content": reply[0].text})\n'
                  'print(reply[0].finish_reason, reply[0].usage)'),
    new_markdown_cell("## A batch\n\nPrompts separated by a line `---` run together as one batch. Variables "
                      "interpolate with `{name}`; unknown braces (code!) stay as written and `{{` escapes."),
    new_code_cell('country = "Japan"'),
    new_code_cell("%%generate --chat --temperature 0 --max-tokens 20\nWhat is the capital of {country}?\n---\n"
                  "Complete this Python dict: {'a': 1, 'b': ...}\n---\nName three colours."),
    new_markdown_cell("## Sampling\n\nEvery sampling option of OpenAI and vLLM is here: `--temperature`, "
                      "`--top-p`, `--top-k`, `--min-p`, the three penalties, `--seed` (same seed, same text), "
                      "`--stop` and `-n` samples."),
    new_code_cell("%%generate --temperature 0.8 --top-p 0.9 --top-k 40 --seed 42 -n 2 --max-tokens 24 --stop '\\n\\n'\n"
                  "Once upon a time, in a small village,"),
    new_markdown_cell("## Log-probabilities\n\n`--logprobs K` returns each token's log-probability with its K "
                      "most likely alternatives."),
    new_code_cell("%%generate --temperature 0 --max-tokens 4 --logprobs 3 -o scored\nThe capital of France is"),
    new_code_cell("for lp in scored[0].logprobs:\n    print(repr(lp.token), round(lp.logprob, 3), "
                  "[(t, round(v, 2)) for _, t, v in lp.top])"),
    new_markdown_cell("## The same from Python\n\nThe magics are a thin layer: the manager does the work."),
    new_code_cell("import jupyter_llm as jl\n\nmanager = jl.get_manager()\n"
                  "answers = manager.generate(['2 + 2 =', 'The opposite of hot is'], "
                  "jl.SamplingParams(max_tokens=6, temperature=0))\n"
                  "for c in answers:\n    print(c.prompt_index, repr(c.text), c.finish_reason, "
                  "f'{c.timings.ttft * 1000:.0f} ms to first token')"),
    new_markdown_cell("## Status\n\n`%llm_backend` shows what is loaded; `%config LLMMagics.max_tokens = 64` "
                      "changes a default."),
    new_code_cell("%config LLMMagics.max_tokens = 64\n%llm_backend"),
]
nb = new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                        "language": "python"}})
nbformat.write(nb, "notebooks/01-quickstart.ipynb")
