"""Greedy output of the hf backend equals plain transformers `generate(do_sample=False)`."""
import pytest
import torch

from jupyter_llm.schema import SamplingParams


def reference(model, tokenizer, prompt_ids, max_new_tokens):
    """transformers' greedy tokens, without the EOS token that ends them (ours never includes it)."""
    eos = list(tokenizer.eos_token_ids)
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt_ids]),
                             attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=eos[0], eos_token_id=eos)
    new = out[0, len(prompt_ids):].tolist()
    ends = [i for i, t in enumerate(new) if t in eos]
    return new[:ends[0]] if ends else new


def check(manager, name, prompts, max_tokens):
    backend = manager.get(name)
    ours = manager.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0), backend=name)
    for prompt, completion in zip(prompts, ours):
        ids = backend.tokenizer.encode(prompt)
        assert completion.token_ids == reference(backend.hf_model, backend.tokenizer, ids, max_tokens), prompt


def test_tiny_model_greedy_equals_transformers(manager, tiny_hf):
    check(manager, tiny_hf, ["Hello world", "The capital of France is", "def add(a, b):"], 20)


@pytest.mark.embedded
def test_embedded_model_greedy_equals_transformers(manager, embedded_hf):
    check(manager, embedded_hf, ["The capital of France is", "Once upon a time,", "def fibonacci(n):"], 24)


@pytest.mark.embedded
def test_embedded_chat_answers_paris(manager, embedded_hf):
    [c] = manager.generate("What is the capital of France?", SamplingParams(max_tokens=16, temperature=0),
                           backend=embedded_hf, chat=True)
    assert "Paris" in c.text
