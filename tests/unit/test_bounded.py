"""The bounded readers of an upstream's answer (backends/bounded.py): each stops at its bound, reading no further."""

from __future__ import annotations

import pytest

from backends.base import UpstreamError
from backends.bounded import capped, read_head, read_whole


class Pieces:
    """``count`` pieces of ``size`` bytes, counting how many were taken."""

    def __init__(self, count: int, size: int = 1000) -> None:
        self.count, self.size, self.taken = count, size, 0

    def __iter__(self):
        while self.taken < self.count:
            self.taken += 1
            yield b"x" * self.size


def test_read_whole_reads_up_to_its_bound_and_stops_at_the_piece_past_it():
    assert read_whole(Pieces(5), 5000, "upstream u", "UPSTREAM_MAX_BODY_BYTES") == b"x" * 5000
    endless = Pieces(10**9)
    with pytest.raises(UpstreamError, match=r"^upstream u sent an answer larger than aigate reads "
                                            r"\(UPSTREAM_MAX_BODY_BYTES: 4999 bytes\)$"):
        read_whole(endless, 4999, "upstream u", "UPSTREAM_MAX_BODY_BYTES")
    assert endless.taken == 5


def test_capped_passes_pieces_on_until_its_bound():
    endless = Pieces(10**9)
    passed = []
    with pytest.raises(UpstreamError, match="UPSTREAM_MAX_MEDIA_BYTES: 2500 bytes"):
        for piece in capped(endless, 2500, "Cloudflare Workers AI", "UPSTREAM_MAX_MEDIA_BYTES"):
            passed.append(piece)
    assert len(passed) == 2 and endless.taken == 3
    assert b"".join(capped(Pieces(3), 3000, "u", "S")) == b"x" * 3000


def test_read_head_keeps_the_start_and_leaves_the_rest_unread():
    endless = Pieces(10**9)
    assert read_head(endless, 2500) == b"x" * 2500 and endless.taken == 3
    assert read_head(Pieces(2), 2500) == b"x" * 2000
