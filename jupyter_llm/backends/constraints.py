"""Constrained decoding for the in-process backends, through llguidance (vLLM's "guidance"
structured-output backend): a `GrammarCompiler` per backend turns a `StructuredOutput` into a
matcher over the backend's tokenizer, once per distinct constraint; each sample gets its own
`Constraint` (a copy of that matcher), whose token mask the shared sampler applies to the
logits before penalties, temperature and the filters, and which advances over every token
the sample takes.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from typing import Any

from jupyter_llm.errors import ConstraintError
from jupyter_llm.structured import StructuredOutput
from jupyter_llm.tokenizers import GGUFVocab, Tokenizer

log = logging.getLogger(__name__)

CACHED_GRAMMARS = 64


class Constraint:
    """One sample's matcher: which tokens may come next, and where the grammar stands."""

    def __init__(self, matcher: Any, vocab_size: int):
        self.matcher = matcher
        self.vocab_size = vocab_size  # the tokenizer's: the logits may be wider (padded vocabularies)

    @property
    def mask_words(self) -> int:
        return (self.vocab_size + 31) // 32

    def fill_mask(self, words: Any) -> None:
        """Write the allowed tokens' bits into `words` (a contiguous int32 row of mask_words)."""
        self.matcher.unsafe_compute_mask_ptr(words.data_ptr(), words.numel() * 4)

    def advance(self, token_id: int) -> None:
        """Take the sampled token; a token the mask forbade (a fault, never a sampled one)
        leaves the matcher in error, and `failed` says so."""
        self.matcher.consume_token(token_id)

    @property
    def done(self) -> bool:
        """The grammar is complete and nothing but the end may follow."""
        return self.matcher.is_stopped()

    @property
    def failed(self) -> str | None:
        """Why the matcher stopped matching, or None."""
        if not self.matcher.is_error():
            return None
        return self.matcher.get_error() or "the constraint failed"


class GrammarCompiler:
    """Compiles constraints for one tokenizer and keeps the latest CACHED_GRAMMARS matchers, so
    that a schema sent again costs a copy, not a compile. Thread-safe (prepare runs in the
    caller's thread or the server's executor)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._lltokenizer: Any = None
        self._compiled: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.compiles = 0
        self.cache_hits = 0
        self.last_compile_ms: float | None = None

    def constraint(self, structured: StructuredOutput) -> Constraint:
        """A fresh matcher for one sample (raises ConstraintError when the grammar admits no text)."""
        grammar = structured.grammar_text()
        with self._lock:
            template = self._compiled.get(grammar)
            if template is not None:
                self._compiled.move_to_end(grammar)
                self.cache_hits += 1
            else:
                template = self._compile(structured, grammar)
                self._compiled[grammar] = template
                if len(self._compiled) > CACHED_GRAMMARS:
                    self._compiled.popitem(last=False)
        return Constraint(template.deep_copy(), self._lltokenizer.vocab_size)

    def _compile(self, structured: StructuredOutput, grammar: str) -> Any:
        import llguidance
        import torch

        started = time.perf_counter()
        tokenizer = self._tokenizer()
        matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ConstraintError(f"{structured.describe()} does not compile: {matcher.get_error()}")
        probe = Constraint(matcher.deep_copy(), tokenizer.vocab_size)
        probe.fill_mask(torch.zeros(probe.mask_words, dtype=torch.int32))
        if probe.failed:  # e.g. a regex whose language is empty: no first token can extend it
            raise ConstraintError(f"{structured.describe()} admits no text: nothing can be generated under it")
        self.compiles += 1
        self.last_compile_ms = (time.perf_counter() - started) * 1000
        log.info("compiled a %s constraint in %.1f ms", structured.describe(), self.last_compile_ms)
        return matcher

    def _tokenizer(self) -> Any:
        """llguidance's view of the backend's tokenizer (built once: about a second)."""
        if self._lltokenizer is None:
            eos = sorted(self.tokenizer.eos_token_ids) or None
            hf = self.tokenizer.hf
            if isinstance(hf, GGUFVocab):
                import llama_cpp
                from llguidance.llamacpp import lltokenizer_from_vocab

                vocab = llama_cpp.llama_model_get_vocab(hf.llama.model)
                self._lltokenizer = lltokenizer_from_vocab(vocab, eos_token=eos)
            else:
                from llguidance.hf import from_tokenizer

                self._lltokenizer = from_tokenizer(hf, eos_token=eos)
        return self._lltokenizer

    def stats(self) -> dict[str, Any]:
        return {"grammars_compiled": self.compiles, "grammar_cache_hits": self.cache_hits,
                "last_grammar_compile_ms": None if self.last_compile_ms is None else round(self.last_compile_ms, 1)}
