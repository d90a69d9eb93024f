"""The detokenizer (a split emoji), the stop matcher (a stop string split across tokens)
and the per-sample output processor, on a real byte-level tokenizer built by the tests."""
import pytest

from jupyter_llm.params import SamplingParams
from jupyter_llm.tokens import IncrementalDetokenizer, SampleOutputProcessor, StopMatcher, Tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    from jupyter_llm.backends.hf import load_tokenizer

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
    assert p.append(eos).finish_reason is None and p.output_ids == [eos]


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
