"""Tokenizers behind one interface: `Tokenizer` wraps a transformers tokenizer, or anything
shaped like one, with what every in-process backend needs (end-of-turn ids, the chat template,
prompt encoding). Two vocabularies feed it: an HF folder's (`load_tokenizer`) and a GGUF file's
own, through llama-cpp-python (`GGUFVocab`, `load_gguf_tokenizer`).

`GGUFVocab` offers the few methods of a transformers tokenizer that `Tokenizer` and
`jupyter_llm.output` use, so EOS detection, prompt encoding, the incremental detokenizer and stop
strings are shared code. Its chat template comes from the GGUF metadata and renders with jinja2
the way transformers renders it (llama-cpp-python's `Jinja2ChatFormatter`). `llama_cpp` and
`transformers` are imported on use: `%load_ext` imports this module, and llama.cpp must not load
in a process before its CPU probe has passed (backends/llamacpp/probe.py).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from jupyter_llm.schema import GenerationRequest, Message

if TYPE_CHECKING:
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

# Special tokens that end a turn in common chat formats. The GGUF of SmolLM2 names only
# <|im_end|> as EOS, yet the model also ends text with <|endoftext|>.
_END_TOKENS = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "</s>", "<|end|>")
# The classes that are tokenizer.json and nothing else (transformers 5's and 4's names).
_GENERIC_FAST_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


class TextTokenizer(Protocol):
    """What the services need from a tokenizer (a transformers tokenizer fits)."""

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...
    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...


class Tokenizer:
    """A transformers tokenizer with the services every backend needs."""

    def __init__(self, hf_tokenizer: Any, extra_eos_ids: tuple[int, ...] = ()):
        self.hf = hf_tokenizer
        ids = set(extra_eos_ids)
        if hf_tokenizer.eos_token_id is not None:
            ids.add(hf_tokenizer.eos_token_id)
        vocab = hf_tokenizer.get_vocab()
        ids.update(vocab[t] for t in _END_TOKENS if t in vocab)
        self.eos_token_ids = frozenset(ids)
        self.vocab_size = len(hf_tokenizer)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    def apply_chat_template(self, messages: list[Message]) -> str:
        if not self.has_chat_template:
            raise ValueError("this model's tokenizer has no chat template; send a plain prompt instead of --chat")
        return self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def prompt_ids(self, request: GenerationRequest) -> list[int]:
        """The token ids a request's prompt or conversation encodes to."""
        if request.prompt_token_ids is not None:
            return list(request.prompt_token_ids)
        if request.messages is not None:
            # The template already contains the special tokens it wants.
            return self.encode(self.apply_chat_template(request.messages), add_special_tokens=False)
        return self.encode(request.prompt or "")


def load_tokenizer(folder: str) -> Tokenizer:
    """A Tokenizer for an HF folder, with the generation config's EOS ids too."""
    # transformers on use: backends without it (openai with a GGUF tokenizer) import this module too.
    from transformers import AutoTokenizer, GenerationConfig, PreTrainedTokenizerFast

    # AutoTokenizer resolves the class through transformers' config machinery, about 55 MB of
    # modules that stay resident; a folder that names the generic fast class needs none of it.
    generic = _tokenizer_class(folder) in _GENERIC_FAST_CLASSES and (Path(folder) / "tokenizer.json").is_file()
    hf_tokenizer = (PreTrainedTokenizerFast if generic else AutoTokenizer).from_pretrained(folder)
    extra: tuple[int, ...] = ()
    try:
        eos = GenerationConfig.from_pretrained(folder).eos_token_id
        extra = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
    except OSError:
        pass
    return Tokenizer(hf_tokenizer, extra)


def _tokenizer_class(folder: str) -> str | None:
    """The tokenizer class an HF folder's tokenizer_config.json names, if any."""
    try:
        config = json.loads((Path(folder) / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return None
    return config.get("tokenizer_class") if isinstance(config, dict) else None


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
