from hypothesis import given
from hypothesis import strategies as st

from backends.stops import StopMatcher


def run(stops, pieces):
    m = StopMatcher(stops)
    out = "".join(m.feed(p) for p in pieces) + m.flush()
    return out, m.stopped


def test_no_stops_passes_everything_through():
    m = StopMatcher([])
    assert m.feed("abc") == "abc" and m.flush() == ""


def test_stop_split_across_pieces_is_never_emitted():
    m = StopMatcher(["END"])
    assert m.feed("hello E") == "hello "
    assert m.feed("N") == ""
    assert m.feed("D and more") == ""
    assert m.stopped and m.flush() == ""


def test_false_start_is_released():
    m = StopMatcher(["END"])
    assert m.feed("EN") == ""
    assert m.feed("x") == "ENx"
    assert not m.stopped


def test_held_text_is_flushed_at_the_end():
    assert run(["END"], ["abc", "EN"]) == ("abcEN", False)


def test_earliest_of_several_stops_wins_and_is_named():
    assert run(["yz", "b"], ["xyzab"]) == ("x", True)
    assert run(["\n\n", "。"], ["你好", "。再见"]) == ("你好", True)
    m = StopMatcher(["b", "yz"])
    assert m.feed("xyzab") == "x" and m.matched == "yz"
    m = StopMatcher(["END"])
    assert m.feed("abc") == "abc" and m.flush() == "" and m.matched is None


def test_a_stop_that_began_earlier_wins_however_the_text_was_split():
    # "{" is complete first, but "0{0" started earlier: the answer must not depend on the pieces.
    assert run(["{", "0{0"], ["0{", "0"]) == ("", True)
    assert run(["{", "0{0"], ["0{", "x"]) == ("0", True)
    assert run(["{", "0{0"], ["0{"]) == ("0", True)  # the text ended: "{" it is


def test_overlapping_prefixes():
    assert run(["aab"], ["a", "a", "a", "b", "c"]) == ("a", True)


@given(st.text(max_size=40), st.lists(st.text(min_size=1, max_size=4), min_size=1, max_size=3),
       st.data())
def test_any_split_equals_cutting_the_whole_text(text, stops, data):
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=6)))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    expected = (text[:min(found)], True) if found else (text, False)
    m = StopMatcher(stops)
    assert ("".join(m.feed(p) for p in pieces) + m.flush(), m.stopped) == expected
    # The stop string named is one that starts where the text was cut.
    assert m.matched is None if not found else text.find(m.matched) == min(found)
