"""A generation row: stops, held-back text, and pieces that add up to the answer."""

from __future__ import annotations

from lora_cli.serve.streams import CANCELLED, LENGTH, STOP, Row

WORDS = {1: "he", 2: "llo", 3: "\n", 4: " wor", 5: "ld", 6: "\ufffd"}


def make_row(**kwargs):
    pieces = []
    row = Row(prompt_ids=[0], decode=lambda ids: "".join(WORDS[i] for i in ids),
              emit=lambda text, finish: pieces.append((text, finish)), eos_ids=frozenset({9}), **kwargs)
    return row, pieces


def test_pieces_add_up_and_length_finishes():
    row, pieces = make_row(max_tokens=3)
    assert [row.push(t) for t in (1, 2, 4)] == [False, False, True]
    assert row.finish_reason == LENGTH
    assert "".join(p for p, _ in pieces) == row.text == "hello wor"
    assert pieces[-1][1] == LENGTH and all(f is None for _, f in pieces[:-1])


def test_eos_stops_without_text():
    row, pieces = make_row(max_tokens=10)
    row.push(1)
    assert row.push(9)
    assert (row.text, row.finish_reason, row.ids) == ("he", STOP, [1])


def test_stop_string_is_never_streamed():
    row, pieces = make_row(max_tokens=10, stop=["\n\n", "lo\n"])
    row.push(1)
    row.push(2)  # "hello": "lo" may begin "lo\n", so only "hel" is out
    assert "".join(p for p, _ in pieces) == "hel"
    assert row.push(3)  # "hello\n" holds "lo\n": cut there
    assert row.text == "hel" and row.finish_reason == STOP
    assert "".join(p for p, _ in pieces) == "hel"


def test_held_text_is_released_when_it_cannot_become_a_stop():
    row, pieces = make_row(max_tokens=10, stop=["\n\n"])
    row.push(3)  # "\n" could start "\n\n"
    assert "".join(p for p, _ in pieces) == ""
    row.push(4)
    assert "".join(p for p, _ in pieces) == "\n wor"


def test_half_a_character_waits():
    row, pieces = make_row(max_tokens=10)
    row.push(1)
    row.push(6)
    assert "".join(p for p, _ in pieces) == "he"


def test_cancel_finishes_at_next_token_and_close_ends_the_rest():
    row, _ = make_row(max_tokens=10)
    row.push(1)
    row.cancel()
    assert row.push(2)
    assert row.finish_reason == CANCELLED and row.ids == [1]
    other, pieces = make_row(max_tokens=10)
    other.push(1)
    other.close()
    assert other.finish_reason == LENGTH and pieces[-1] == ("", LENGTH)
