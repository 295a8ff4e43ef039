"""Incremental detokenization and stop strings, on SmolLM2's byte-level BPE tokenizer."""

import pytest

from app.textstream import TextStream

MULTILINGUAL = "Grüße, 世界! 🤖👩‍🔬 naïve café — done."


def stream_all(tokenizer, text: str, stop: tuple[str, ...] = ()) -> tuple[list[str], TextStream]:
    stream = TextStream(tokenizer, stop)
    pieces = [stream.push(i) for i in tokenizer(text, add_special_tokens=False).input_ids]
    if not stream.stopped:
        pieces.append(stream.flush())
    return pieces, stream


def test_multibyte_characters_split_across_tokens_are_never_garbled(tokenizer):
    ids = tokenizer(MULTILINGUAL, add_special_tokens=False).input_ids
    # The emoji alone takes several byte tokens: some steps must emit nothing rather than a broken character.
    assert len(ids) > len(MULTILINGUAL.split())
    pieces, stream = stream_all(tokenizer, MULTILINGUAL)
    assert "".join(pieces) == MULTILINGUAL == stream.output
    assert not any("\ufffd" in p for p in pieces)
    assert "" in pieces


def test_stop_string_ends_the_text_and_is_not_emitted(tokenizer):
    pieces, stream = stream_all(tokenizer, "The answer is 42.\nUser: next question", stop=("\nUser:",))
    assert stream.stopped
    assert "".join(pieces) == "The answer is 42." == stream.output


def test_a_partial_stop_string_is_held_back_then_released(tokenizer):
    stream = TextStream(tokenizer, ("ENDX",))
    emitted = "".join(stream.push(i) for i in tokenizer("hello END", add_special_tokens=False).input_ids)
    assert emitted == "hello "  # "END" could still become "ENDX"
    assert stream.flush() == "END"
    assert not stream.stopped


@pytest.mark.parametrize("stops", [("b", "cd"), ("cd", "b")])
def test_the_earliest_of_several_stop_strings_wins(tokenizer, stops):
    pieces, stream = stream_all(tokenizer, "a b cd e", stop=stops)
    assert "".join(pieces) == "a "
    assert stream.stopped
