"""What a load leaves resident (issue 16, item 5): freed heap memory handed back, no torch._dynamo
for a model built on the meta device, no AutoTokenizer machinery for a plain tokenizer.json."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from jupyter_llm.heap import release_freed_memory


def run_python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip().splitlines()[-1]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_freed_heap_memory_goes_back_to_the_system():
    assert release_freed_memory() is True
    out = run_python("""
        from jupyter_llm.heap import release_freed_memory
        def rss_mib():
            return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
        chunks = [bytearray(8192) for _ in range(20000)]  # 160 MB of malloc'd (not mmapped) blocks
        keep = chunks[-1:]  # the heap's top stays in use: only trimming inside the heap frees the rest
        del chunks
        before = rss_mib()
        release_freed_memory()
        print(before - rss_mib())
    """)
    assert float(out) > 100  # MiB handed back


def test_a_model_built_on_the_meta_device_leaves_torch_dynamo_unimported(tiny_llama, tiny_gpt2):
    for folder in (tiny_llama, tiny_gpt2):
        out = run_python(f"""
            import sys, torch
            from pathlib import Path
            from jupyter_llm.backends.native.config import ModelConfig
            from jupyter_llm.backends.native.models import build_model
            with torch.device("meta"):
                model = build_model(ModelConfig.from_folder(Path({str(folder)!r})))
            print(sum(p.is_meta for p in model.parameters()) == len(list(model.parameters())),
                  "torch._dynamo" in sys.modules)
        """)
        assert out == "True False", folder


def test_a_generic_tokenizer_folder_loads_without_auto_tokenizer_and_reads_the_same(tiny_llama):
    from transformers import AutoTokenizer

    from jupyter_llm.tokenizers import load_tokenizer

    assert json.loads((Path(tiny_llama) / "tokenizer_config.json").read_text())["tokenizer_class"] in (
        "TokenizersBackend", "PreTrainedTokenizerFast")
    ours, auto = load_tokenizer(str(tiny_llama)), AutoTokenizer.from_pretrained(str(tiny_llama))
    text = "The capital of France is Paris. 😀 café {braces}"
    assert ours.encode(text) == auto.encode(text)
    assert ours.decode(auto.encode(text)) == auto.decode(auto.encode(text), skip_special_tokens=True)
    messages = [{"role": "user", "content": "Hello"}]
    assert ours.apply_chat_template(messages) == auto.apply_chat_template(messages, tokenize=False,
                                                                         add_generation_prompt=True)
    assert ours.eos_token_ids >= {auto.eos_token_id}
    out = run_python(f"""
        import sys
        from jupyter_llm.tokenizers import load_tokenizer
        load_tokenizer({str(tiny_llama)!r})
        print("accelerate" in sys.modules)  # what AutoTokenizer's resolution imports (with PIL, and more)
    """)
    assert out == "False"
