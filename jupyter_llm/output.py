"""From sampled ids to text: an incremental detokenizer, a stop-string matcher and the
per-sample output processor that combines them (what turns sampled ids into `TokenEvent`s)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from jupyter_llm.schema import SamplingParams, TokenEvent, TokenLogprob
from jupyter_llm.tokenizers import TextTokenizer, Tokenizer

if TYPE_CHECKING:
    from jupyter_llm.backends.constraints import Constraint


class IncrementalDetokenizer:
    """Turns ids into text one token at a time, never emitting half a UTF-8 character.

    As in vLLM: decode a short window before the new tokens and after it, and emit the
    difference only once it no longer ends in U+FFFD (an incomplete byte sequence).
    A few prompt tokens seed the window so that a leading space decodes right.
    """

    def __init__(self, tokenizer: TextTokenizer, prompt_ids: list[int] = (), window: int = 5):
        self.tokenizer = tokenizer
        self.ids: list[int] = list(prompt_ids[-window:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        prefix_text = decode(self.ids[self.prefix_offset:self.read_offset], skip_special_tokens=True)
        new_text = decode(self.ids[self.prefix_offset:], skip_special_tokens=True)
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return new_text[len(prefix_text):]

    def flush(self) -> str:
        """Text still held back (an incomplete character at the very end) when the output ends."""
        prefix_text = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset], skip_special_tokens=True)
        new_text = self.tokenizer.decode(self.ids[self.prefix_offset:], skip_special_tokens=True)
        self.prefix_offset = self.read_offset = len(self.ids)
        return new_text[len(prefix_text):]


class _StopAutomaton:
    """Knuth-Morris-Pratt over one stop string: `state` is the length of the longest prefix of
    the stop string that ends the text fed so far. Each character costs amortised O(1)."""

    def __init__(self, stop: str):
        self.stop = stop
        self.fail = [0] * len(stop)  # fail[i]: longest proper border of stop[:i + 1]
        k = 0
        for i in range(1, len(stop)):
            while k and stop[i] != stop[k]:
                k = self.fail[k - 1]
            if stop[i] == stop[k]:
                k += 1
            self.fail[i] = k
        self.state = 0

    def feed(self, text: str) -> bool:
        """Advance over `text`; True when the whole stop string occurs in what was fed."""
        stop, fail, k = self.stop, self.fail, self.state
        for ch in text:
            while k and ch != stop[k]:
                k = fail[k - 1]
            if ch == stop[k]:
                k += 1
                if k == len(stop):
                    self.state = k
                    return True
        self.state = k
        return False


class StopMatcher:
    """Finds stop strings in streamed text, holding back text that could be the start of one.

    `feed` returns the text that is safe to show and the stop string that matched (the stop
    string itself is never shown); `flush` releases what was held back when the text ends.
    The work per piece of text is bounded by its length times the number of stop strings
    (one automaton each), and the searched window by the longest stop string
    (`params.MAX_STOP_CHARS`), whatever the stop strings look like.
    """

    def __init__(self, stops: tuple[str, ...] | list[str]):
        self.stops = tuple(stops)
        self._automata = [_StopAutomaton(stop) for stop in self.stops]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, str | None]:
        buffer = self.pending + text
        if not self.stops:
            self.pending = ""
            return buffer, None
        if any([automaton.feed(text) for automaton in self._automata]):  # noqa: C419 (a list: every automaton advances)
            # Some stop string ends inside `buffer` (the held text plus `text`): the one that starts first wins.
            index, stop = min((buffer.find(s), s) for s in self.stops if s in buffer)
            self.pending = ""
            for automaton in self._automata:  # what follows is matched afresh, as the text was consumed
                automaton.state = 0
            return buffer[:index], stop
        hold = max(automaton.state for automaton in self._automata)
        self.pending = buffer[len(buffer) - hold:] if hold else ""
        return buffer[:len(buffer) - hold], None

    def flush(self) -> str:
        text, self.pending = self.pending, ""
        return text


class SampleOutputProcessor:
    """Turns the sampled ids of one sample into TokenEvents: end-of-sequence, max_tokens,
    the context limit, detokenizing and stop strings, all in one place.

    The ids themselves live in the engine's sequence (which may run ahead of the events, by the
    accepted guesses of a speculative step): this counts the tokens it has emitted."""

    def __init__(self, tokenizer: Tokenizer, request_id: str, index: int, params: SamplingParams,
                 prompt_ids: list[int], max_model_len: int, constraint: Constraint | None = None):
        self.tokenizer = tokenizer
        self.constraint = constraint  # the sample's grammar: complete, the sample stops
        self.request_id = request_id
        self.index = index
        self.params = params
        self.prompt_len = len(prompt_ids)
        self.max_model_len = max_model_len
        self.detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids)
        self.stop_matcher = StopMatcher(params.stop)
        self.num_emitted = 0  # output tokens sent in events
        self.finish_reason: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def _logprob(self, token_id: int, raw: tuple[float, list[int], list[float]]) -> TokenLogprob:
        decode = self.tokenizer.decode
        logprob, top_ids, top_values = raw
        return TokenLogprob(token_id, decode([token_id], skip_special_tokens=False), logprob,
                            [(i, decode([i], skip_special_tokens=False), v) for i, v in zip(top_ids, top_values)])

    def append(self, token_id: int, logprob: tuple[float, list[int], list[float]] | None = None) -> TokenEvent:
        assert not self.finished, "sample already finished"
        event = TokenEvent(self.request_id, self.index)
        if token_id in self.tokenizer.eos_token_ids and not self.params.ignore_eos:
            return self._finish(event, "stop")
        self.num_emitted += 1
        event.token_ids = [token_id]
        if logprob is not None:
            event.logprobs = [self._logprob(token_id, logprob)]
        text, stop = self.stop_matcher.feed(self.detokenizer.add(token_id))
        event.text = text
        if stop is not None:
            event.stop_reason = stop
            return self._finish(event, "stop")
        generated = self.num_emitted
        if self.constraint is not None and (self.constraint.done or self.constraint.failed):
            self._flush_into(event)
            event.error = self.constraint.failed
            return self._finish(event, "error" if event.error else "stop")
        if generated >= self.params.max_tokens or self.prompt_len + generated >= self.max_model_len:
            self._flush_into(event)
            return self._finish(event, "length" if event.stop_reason is None else "stop")
        return event

    def _flush_into(self, event: TokenEvent) -> None:
        """The text ends: what was held back goes out (the text held back for an incomplete
        character may complete a stop string too)."""
        tail, stop = self.stop_matcher.feed(self.detokenizer.flush())
        event.text += tail + self.stop_matcher.flush()
        event.stop_reason = stop

    def abort(self, reason: str = "cancelled", error: str | None = None) -> TokenEvent:
        """The last event of a sample that ends early (cancelled or failed)."""
        event = TokenEvent(self.request_id, self.index, text=self.stop_matcher.flush(), error=error)
        return self._finish(event, reason)

    def _finish(self, event: TokenEvent, reason: str) -> TokenEvent:
        self.finish_reason = reason
        event.finish_reason = reason
        event.prompt_tokens = self.prompt_len
        return event
