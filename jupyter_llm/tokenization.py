"""Tokenizers behind one interface: a transformers tokenizer (or anything shaped like one,
such as a GGUF vocabulary) with the end-of-turn ids, the chat template and prompt encoding
every backend needs."""
from __future__ import annotations

from typing import Any, Protocol

from jupyter_llm.schema import GenerationRequest, Message

# Special tokens that end a turn in common chat formats. The GGUF of SmolLM2 names only
# <|im_end|> as EOS, yet the model also ends text with <|endoftext|>.
_END_TOKENS = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "</s>", "<|end|>")


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
    from transformers import AutoTokenizer, GenerationConfig

    hf_tokenizer = AutoTokenizer.from_pretrained(folder)
    extra: tuple[int, ...] = ()
    try:
        eos = GenerationConfig.from_pretrained(folder).eos_token_id
        extra = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
    except OSError:
        pass
    return Tokenizer(hf_tokenizer, extra)
