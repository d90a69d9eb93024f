"""The tokenizer services of a backend that holds the model's tokenizer in this process (the
in-process engines, and the GPU engines, whose tokenizer files are loaded here too so that
prompts are counted before they are sent)."""
from __future__ import annotations

from jupyter_llm.backends.base import check_prompt_fits
from jupyter_llm.schema import GenerationRequest, Message
from jupyter_llm.tokenizers import Tokenizer


class TokenizerServices:
    """Mixed in before `Backend`: its tokenizer methods, from `self.tokenizer` and the context
    length `self._max_model_len`, both set by `load()`."""

    tokenizer: Tokenizer
    _max_model_len: int

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def apply_chat_template(self, messages: list[Message]) -> str:
        return self.tokenizer.apply_chat_template(messages)

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self.tokenizer.eos_token_ids

    def prompt_ids(self, request: GenerationRequest) -> list[int]:
        return self.tokenizer.prompt_ids(request)

    def prompt_ids_within_context(self, request: GenerationRequest) -> list[int]:
        """The request's prompt ids, refused when they leave no room for one generated token."""
        prompt_ids = self.tokenizer.prompt_ids(request)
        check_prompt_fits(len(prompt_ids), self._max_model_len)
        return prompt_ids
