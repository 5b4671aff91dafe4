import pytest
from hypothesis import given
from hypothesis import strategies as st

from backends.base import UpstreamError
from backends.sse_reader import sse_data

MB = 1024 * 1024


def read(chunks, max_event: int = MB) -> list[str]:
    return list(sse_data(chunks, max_event, "upstream u"))


def test_frames_comments_and_crlf():
    stream = [b'data: {"response":"a"}\r\n\r\n: keepalive\n\ndata:{"x":1}\n', b"\ndata: [DONE]\n\n"]
    assert read(stream) == ['{"response":"a"}', '{"x":1}', "[DONE]"]


def test_multi_line_data_and_other_fields():
    assert read([b"event: ping\nid: 3\ndata: a\ndata: b\n\n"]) == ["a\nb"]
    assert read([b"data: a\ndata:\ndata: \n\n"]) == ["a\n\n"]  # empty data lines are lines of the event


def test_an_event_cut_off_at_the_end_is_still_seen():
    assert read([b'data: {"response":"x"}\n\ndata: {"resp']) == ['{"response":"x"}', '{"resp']


def test_a_line_past_the_bound_fails_without_reading_on():
    pulled = 0

    def endless_line():
        nonlocal pulled
        yield b"data: "
        while True:
            pulled += 1
            yield b"x" * 65536

    with pytest.raises(UpstreamError, match=r"upstream u sent a line larger than aigate reads "
                                            r"\(UPSTREAM_MAX_EVENT_BYTES: 1048576 bytes\)"):
        read(endless_line())
    assert pulled == 16  # stopped at the piece that crossed the bound


def test_an_event_of_many_lines_past_the_bound_fails():
    line = b"data: " + b"y" * 1000 + b"\n"
    with pytest.raises(UpstreamError, match="sent an event larger"):
        read([line] * 20, max_event=10_000)
    assert read([line] * 5 + [b"\n"], max_event=10_000) == ["\n".join(["y" * 1000] * 5)]  # within it: read


def test_the_bound_holds_whatever_the_chunks():
    """A line exactly at the bound passes, one byte more fails, however the bytes are split."""
    at = b"data: " + b"z" * 94  # 100 bytes
    assert read([at[:7], at[7:], b"\n\n"], max_event=100) == ["z" * 94]
    with pytest.raises(UpstreamError):
        read([at, b"z", b"\n\n"], max_event=100)
    with pytest.raises(UpstreamError):
        read([at + b"z\n\n"], max_event=100)


TEXT = st.text(st.characters(blacklist_characters="\r\n", blacklist_categories=("Cs",)), max_size=20)


@given(st.lists(TEXT, max_size=6), st.data())
def test_any_split_of_the_bytes_gives_the_same_events(payloads, data):
    raw = b"".join(b"data: " + p.encode() + b"\r\n\r\n" for p in payloads if p)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(raw)), max_size=8)))
    chunks = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)])]
    assert read(chunks) == [p for p in payloads if p]
