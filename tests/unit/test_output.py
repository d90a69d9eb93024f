"""The detokenizer (a split emoji), the stop matcher (a stop string split across tokens)
and the per-sample output processor, on a real byte-level tokenizer built by the tests."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jupyter_llm.errors import ParamError
from jupyter_llm.output import IncrementalDetokenizer, SampleOutputProcessor, StopMatcher
from jupyter_llm.schema import MAX_STOP_CHARS, SamplingParams
from jupyter_llm.tokenizers import Tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    from jupyter_llm.tokenizers import load_tokenizer

    return load_tokenizer(str(tiny_llama))


def test_emoji_split_over_byte_tokens_is_never_emitted_half(tokenizer):
    # In a byte-level BPE, an emoji is several tokens; each prefix decodes to U+FFFD.
    ids = tokenizer.encode("ok 😀!", add_special_tokens=False)
    emoji_ids = tokenizer.encode("😀", add_special_tokens=False)
    assert len(emoji_ids) >= 2, "the test needs an emoji spread over several tokens"
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.add(i) for i in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == "ok 😀!"
    assert "" in pieces  # something was held back while the emoji was incomplete


def test_detokenizer_keeps_leading_space_after_prompt(tokenizer):
    prompt = tokenizer.encode("Hello", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, prompt)
    text = "".join(detok.add(i) for i in tokenizer.encode(" world", add_special_tokens=False))
    assert text == " world"


def test_stop_string_split_across_chunks():
    m = StopMatcher(["###"])
    assert m.feed("abc#") == ("abc", None)  # "#" held: could start the stop string
    assert m.feed("#") == ("", None)
    assert m.feed("#tail") == ("", "###")


def test_held_text_is_released_when_it_is_not_a_stop():
    m = StopMatcher(["STOP"])
    assert m.feed("xST") == ("x", None)
    assert m.feed("AR") == ("STAR", None)
    assert m.feed("S") == ("", None)
    assert m.flush() == "S"


def test_earliest_of_several_stops_wins():
    m = StopMatcher(["world", "lo"])
    assert m.feed("hello world") == ("hel", "lo")


def test_processor_stops_on_eos_length_and_stop_strings(tokenizer):
    eos = next(iter(tokenizer.eos_token_ids))
    ids = tokenizer.encode(" Paris. Hello", add_special_tokens=False)
    p = SampleOutputProcessor(tokenizer, "r", 0, SamplingParams(max_tokens=50), [1, 2], 512)
    events = [p.append(i) for i in ids] + [p.append(eos)]
    assert events[-1].finish_reason == "stop" and events[-1].token_ids == []
    assert "".join(e.text for e in events) == " Paris. Hello"

    p = SampleOutputProcessor(tokenizer, "r", 0, SamplingParams(max_tokens=2), [1], 512)
    assert p.append(ids[0]).finish_reason is None
    assert p.append(ids[1]).finish_reason == "length"

    p = SampleOutputProcessor(tokenizer, "r", 0, SamplingParams(stop=(". H",)), [1], 512)
    out = []
    for i in ids:
        event = p.append(i)
        out.append(event.text)
        if event.finish_reason:
            break
    assert "".join(out) == " Paris" and event.stop_reason == ". H"

    p = SampleOutputProcessor(tokenizer, "r", 0, SamplingParams(ignore_eos=True, max_tokens=3), [1], 512)
    event = p.append(eos)
    assert event.finish_reason is None and event.token_ids == [eos] and p.num_emitted == 1


def test_a_stop_string_in_the_text_released_at_the_end_ends_with_stop(tokenizer):
    """The last tokens of an answer cut short in the middle of a character are released when it
    ends; a stop string they complete ends the sample as "stop", with its stop_reason (it was
    "length", the stop string cut but not reported)."""
    ids = tokenizer.encode("ab 😀", add_special_tokens=False)[:-1]  # the emoji's last byte missing
    p = SampleOutputProcessor(tokenizer, "r", 0, SamplingParams(max_tokens=len(ids), stop=("\ufffd",)), [1], 512)
    events = [p.append(i) for i in ids]
    assert "".join(e.text for e in events) == "ab "
    assert (events[-1].finish_reason, events[-1].stop_reason) == ("stop", "\ufffd")
    p = SampleOutputProcessor(tokenizer, "r", 0, SamplingParams(max_tokens=len(ids), stop=("zz",)), [1], 512)
    events = [p.append(i) for i in ids]
    assert events[-1].finish_reason == "length" and events[-1].stop_reason is None
    assert "".join(e.text for e in events).startswith("ab \ufffd")


def test_context_limit_ends_with_length(tokenizer):
    p = SampleOutputProcessor(tokenizer, "r", 0, SamplingParams(max_tokens=100), [1, 2, 3], max_model_len=5)
    assert p.append(10).finish_reason is None
    assert p.append(11).finish_reason == "length"


def test_eos_ids_include_end_of_turn_tokens(tokenizer):
    vocab = tokenizer.hf.get_vocab()
    assert {vocab["<|endoftext|>"], vocab["<|im_end|>"]} <= tokenizer.eos_token_ids
    assert isinstance(tokenizer, Tokenizer)


def test_chat_template_multi_turn(tokenizer):
    text = tokenizer.apply_chat_template([{"role": "system", "content": "S"}, {"role": "user", "content": "U1"},
                                          {"role": "assistant", "content": "A1"}, {"role": "user", "content": "U2"}])
    assert text.index("S") < text.index("U1") < text.index("A1") < text.index("U2")
    assert text.endswith("<|im_start|>assistant\n")


def naive_stop_feed(pending: str, text: str, stops: list[str]) -> tuple[str, str | None, str]:
    """The reference: search the whole buffer; hold its longest tail that starts a stop string."""
    buffer = pending + text
    found = [(buffer.find(s), s) for s in stops if s in buffer]
    if found:
        index, stop = min(found)
        return buffer[:index], stop, ""
    hold = max((n for s in stops for n in range(1, len(s)) if buffer.endswith(s[:n])), default=0)
    return buffer[:len(buffer) - hold], None, buffer[len(buffer) - hold:]


@settings(max_examples=300, deadline=None)
@given(stops=st.lists(st.text("abc", min_size=1, max_size=6), min_size=1, max_size=4),
       pieces=st.lists(st.text("abc", max_size=5), max_size=12))
def test_stop_matcher_agrees_with_the_naive_search(stops, pieces):
    matcher, pending = StopMatcher(stops), ""
    for piece in pieces:
        shown, stop = matcher.feed(piece)
        expected_shown, expected_stop, pending = naive_stop_feed(pending, piece, stops)
        assert (shown, stop) == (expected_shown, expected_stop)
        assert matcher.pending == pending


def test_long_stop_strings_beside_near_misses_hold_exactly_what_could_still_match():
    """Stop strings of the longest accepted length, and near misses that the old search walked
    length by length: text is held back only while the longest one can still complete."""
    longest = "b" + "a" * (MAX_STOP_CHARS - 1)
    stops = ["ba" * (MAX_STOP_CHARS // 2 - i) for i in range(15)] + [longest]
    m = StopMatcher(stops)
    assert all(m.feed("aa") == ("aa", None) for _ in range(50))
    assert m.feed("b") == ("", None) and m.pending == "b"
    held = [m.feed("aa") for _ in range(MAX_STOP_CHARS // 2 - 1)]  # "b" and 1022 a's, all a possible start
    assert held == [("", None)] * (MAX_STOP_CHARS // 2 - 1) and m.pending == "b" + "a" * (MAX_STOP_CHARS - 2)
    assert m.feed("ax") == ("", longest)


def test_a_stop_string_longer_than_the_limit_is_refused():
    SamplingParams(stop=["x" * MAX_STOP_CHARS])
    with pytest.raises(ParamError, match=f"stop strings may have at most {MAX_STOP_CHARS} characters, got one of "
                                         f"{MAX_STOP_CHARS + 1}"):
        SamplingParams(stop=["ok", "x" * (MAX_STOP_CHARS + 1)])
