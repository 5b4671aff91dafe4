"""The request log's closing write: a request's metrics are counted before its line is logged."""

from __future__ import annotations

import logging

import pytest

from web.record import RequestRecord
from web.request_log import RequestLog, log


def test_a_request_is_counted_before_its_line_is_written(caplog: pytest.LogCaptureFixture) -> None:
    # Whoever sees the line (a test, a log shipper beside /metrics) must find the request in the metrics already.
    lines_when_counted: list[int] = []
    record = RequestRecord(id="r-1", method="POST", path="/v1/chat/completions", client="127.0.0.1", status=200)
    with caplog.at_level(logging.INFO, logger=log.name):
        RequestLog(False, lambda r, ended, ttft: lines_when_counted.append(len(caplog.records))).write(record)
    assert lines_when_counted == [0]
    assert len(caplog.records) == 1 and "id=r-1 " in caplog.records[0].getMessage()
