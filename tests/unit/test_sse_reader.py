from hypothesis import given
from hypothesis import strategies as st

from backends.sse_reader import sse_data


def test_frames_comments_and_crlf():
    stream = [b'data: {"response":"a"}\r\n\r\n: keepalive\n\ndata:{"x":1}\n', b"\ndata: [DONE]\n\n"]
    assert list(sse_data(stream)) == ['{"response":"a"}', '{"x":1}', "[DONE]"]


def test_multi_line_data_and_other_fields():
    assert list(sse_data([b"event: ping\nid: 3\ndata: a\ndata: b\n\n"])) == ["a\nb"]


def test_an_event_cut_off_at_the_end_is_still_seen():
    assert list(sse_data([b'data: {"response":"x"}\n\ndata: {"resp'])) == ['{"response":"x"}', '{"resp']


TEXT = st.text(st.characters(blacklist_characters="\r\n", blacklist_categories=("Cs",)), max_size=20)


@given(st.lists(TEXT, max_size=6), st.data())
def test_any_split_of_the_bytes_gives_the_same_events(payloads, data):
    raw = b"".join(b"data: " + p.encode() + b"\r\n\r\n" for p in payloads if p)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(raw)), max_size=8)))
    chunks = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)])]
    assert list(sse_data(chunks)) == [p for p in payloads if p]
