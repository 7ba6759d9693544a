"""Stop-sequence matcher: held-back text, stops across piece boundaries, several stops."""

from __future__ import annotations

from services.gateway.stops import StopMatcher


def run(stops: list[str], pieces: list[str]) -> tuple[list[str], bool]:
    """Feed pieces until a stop; return what was emitted per piece (+ the flush) and whether it stopped."""
    m = StopMatcher(stops)
    out = []
    for piece in pieces:
        text, stopped = m.feed(piece)
        out.append(text)
        if stopped:
            return out, True
    out.append(m.flush())
    return out, False


def test_no_stops_passes_everything_through() -> None:
    assert run([], ["a", "b", ""]) == (["a", "b", "", ""], False)


def test_stop_inside_one_piece_cuts_before_it() -> None:
    assert run(["END"], ["hello ENDworld"]) == (["hello "], True)


def test_stop_across_pieces_is_held_back_then_cut() -> None:
    out, stopped = run(["</answer>"], ["The answer", " is 4<", "/ans", "wer>", " more"])
    assert stopped
    assert out == ["The answer", " is 4", "", ""]
    assert "".join(out) == "The answer is 4"


def test_held_text_is_released_when_it_stops_matching() -> None:
    m = StopMatcher(["\n\n"])
    assert m.feed("line\n") == ("line", False)
    assert m.held == "\n"
    assert m.feed("next") == ("\nnext", False)
    assert m.held == ""


def test_held_text_is_released_at_the_end() -> None:
    out, stopped = run(["STOP"], ["abc ST", "O"])
    assert not stopped
    assert out == ["abc ", "", "STO"]


def test_multiple_stops_the_earliest_match_wins() -> None:
    assert run(["xyz", "b"], ["a", "xy", "b"]) == (["a", "", "xy"], True)
    assert run(["cd", "bcdx"], ["abcd"]) == (["ab"], True)


def test_longest_possible_prefix_is_held_among_several_stops() -> None:
    m = StopMatcher(["abcd", "cx"])
    assert m.feed("zzabc") == ("zz", False)  # "abc" may become "abcd"
    assert m.held == "abc"
    assert m.feed("x") == ("ab", True)  # "cx" completes first


def test_stop_that_is_a_repeated_character() -> None:
    out, stopped = run(["!!!"], ["wow!", "!", "?", "!!", "!"])
    assert stopped
    assert "".join(out) == "wow!!?"


def test_after_a_stop_everything_is_dropped() -> None:
    m = StopMatcher(["."])
    assert m.feed("one. two") == ("one", True)
    assert m.feed("three") == ("", True)
    assert m.flush() == ""


def test_multibyte_text_and_stop() -> None:
    assert run(["日本"], ["こんにちは日", "本語"]) == (["こんにちは", ""], True)
