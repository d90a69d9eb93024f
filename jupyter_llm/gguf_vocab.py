"""A GGUF file's own tokenizer (through llama-cpp-python) behind the shared `Tokenizer`.

`GGUFVocab` offers the few methods of a transformers tokenizer that `jupyter_llm.tokenization` and `jupyter_llm.output`
uses, so EOS detection, prompt encoding, the incremental detokenizer and stop strings are
the shared code. The chat template comes from the GGUF metadata and renders with jinja2
the way transformers renders it (llama-cpp-python's `Jinja2ChatFormatter`).

`llama_cpp` is imported on use: the llamacpp backend imports this module before its CPU
probe has passed (llamacpp/probe.py), and llama.cpp must not load in this process before.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from jupyter_llm.schema import Message
from jupyter_llm.tokenization import Tokenizer

if TYPE_CHECKING:
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter


class GGUFVocab:
    """A transformers-tokenizer look-alike over a loaded `llama_cpp.Llama`."""

    def __init__(self, llama: Llama):
        import llama_cpp

        self.llama = llama
        vocab = llama_cpp.llama_model_get_vocab(llama.model)
        self._texts = [llama_cpp.llama_vocab_get_text(vocab, i).decode("utf-8", "replace")
                       for i in range(llama.n_vocab())]
        eos = llama.token_eos()
        self.eos_token_id: int | None = eos if eos >= 0 else None
        bos = llama.token_bos()
        self.eos_token = self._texts[eos] if eos >= 0 else ""
        self.bos_token = self._texts[bos] if bos >= 0 else ""
        self.chat_template: str | None = llama.metadata.get("tokenizer.chat_template")
        self._formatters: dict[bool, Jinja2ChatFormatter] = {}

    def __len__(self) -> int:
        return len(self._texts)

    def get_vocab(self) -> dict[str, int]:
        return {text: i for i, text in enumerate(self._texts)}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # special=True: "<|im_start|>" in a rendered template is one token, as with transformers.
        # add_bos adds BOS only when the GGUF says the model wants one.
        return self.llama.tokenize(text.encode("utf-8"), add_bos=add_special_tokens, special=True)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        # "replace" keeps an incomplete UTF-8 sequence visible as U+FFFD, which the incremental
        # detokenizer waits on.
        return self.llama.detokenize(list(ids), special=not skip_special_tokens).decode("utf-8", "replace")

    def apply_chat_template(self, messages: list[Message], tokenize: bool = False,
                            add_generation_prompt: bool = True) -> str:
        formatter = self._formatters.get(add_generation_prompt)
        if formatter is None:
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            formatter = Jinja2ChatFormatter(self.chat_template or "", eos_token=self.eos_token,
                                            bos_token=self.bos_token, add_generation_prompt=add_generation_prompt)
            self._formatters[add_generation_prompt] = formatter
        return formatter(messages=messages).prompt


def gguf_tokenizer(llama: Llama) -> Tokenizer:
    """The shared Tokenizer over a loaded llama_cpp.Llama (a full model or vocab_only)."""
    return Tokenizer(GGUFVocab(llama))


def load_gguf_tokenizer(path: str) -> Tokenizer:
    """Only the vocabulary of a GGUF file (no weights): fast, for backends that run elsewhere."""
    import llama_cpp
    from llama_cpp._utils import suppress_stdout_stderr

    # A vocabulary-only model has no training context, and llama.cpp reports that on stderr
    # ("n_ctx_seq > n_ctx_train (0)") although nothing will run: silence the load, as
    # llama-cpp-python silences its own model loads.
    with suppress_stdout_stderr(disable=False):
        return gguf_tokenizer(llama_cpp.Llama(path, vocab_only=True, verbose=False))
