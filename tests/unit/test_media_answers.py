"""What the reranking, transcription and image builders make is what compat/media_answers.py declares
(and /openapi.json describes); and the pieces that stream an upload (its base64, a multipart body)
make the same bytes as the whole file would."""

from __future__ import annotations

import base64
import io
import json
from typing import Any

import msgspec
import pytest
from werkzeug.formparser import parse_form_data

from backends.media import Images, Ranked, Ranking, RerankRequest, Segment, Transcript, Upload, Word
from backends.upstream.media import MultipartBody
from compat import media_answers
from compat.audio import transcription_body, verbose
from compat.images import images_answer
from compat.rerank import RerankCall, rerank_answer

TRANSCRIPT = Transcript("Hello there. General Kenobi.", (Segment(0.0, 1.25, "Hello there."),
                                                          Segment(3601.5, 3603.0, "General Kenobi.")),
                        (Word("Hello", 0.0, 0.5), Word("there.", 0.6, 1.25)), "en", 3603.0)


def holds(obj: dict[str, Any], declaration: Any) -> None:
    msgspec.convert(json.loads(json.dumps(obj)), declaration, strict=True)  # as a client reads it


@pytest.mark.parametrize("documents", [True, False])
def test_rerank_answers(documents):
    call = RerankCall(RerankRequest("m", "q", ("a", "b")), documents)
    answer = rerank_answer(call, "m", Ranking([Ranked(1, 0.9), Ranked(0, -2.5)], 7))
    holds(answer, media_answers.RerankList)
    assert ("document" in answer["results"][0]) is documents


@pytest.mark.parametrize("words", [True, False])
def test_transcription_answers(words):
    holds(verbose(TRANSCRIPT, words), media_answers.TranscriptionVerbose)
    holds(verbose(Transcript("", ()), words), media_answers.TranscriptionVerbose)
    body, content_type = transcription_body(TRANSCRIPT, "json", False)
    assert content_type == "application/json"
    holds(json.loads(body), media_answers.Transcription)


def test_subtitles_time_their_cues():
    srt, vtt = transcription_body(TRANSCRIPT, "srt", False)[0], transcription_body(TRANSCRIPT, "vtt", False)[0]
    assert srt == ("1\n00:00:00,000 --> 00:00:01,250\nHello there.\n\n"
                   "2\n01:00:01,500 --> 01:00:03,000\nGeneral Kenobi.\n\n")
    assert vtt == ("WEBVTT\n\n00:00:00.000 --> 00:00:01.250\nHello there.\n\n"
                   "01:00:01.500 --> 01:00:03.000\nGeneral Kenobi.\n\n")


def test_image_answers():
    holds(images_answer(Images(["aGVsbG8=", "d29ybGQ="])), media_answers.ImagesResponse)


@pytest.mark.parametrize("size", [0, 1, 2, 3, 4, 49151, 49152, 49153, 200_000])
def test_an_upload_streams_the_same_bytes_as_the_whole_file(size):
    data = bytes(range(256)) * (size // 256 + 1)
    upload = Upload(io.BytesIO(data[:size]), size, "a.wav", "audio/wav")
    streamed = b"".join(upload.base64_chunks())
    assert streamed == base64.b64encode(data[:size]) and len(streamed) == upload.base64_size
    assert b"".join(upload.chunks()) == data[:size] == upload.read()  # again, from its start


def test_a_multipart_body_is_the_form_a_server_reads():
    audio = bytes(range(256)) * 300
    fields = [("model", "whisper"), ("timestamp_granularities[]", "word"), ("timestamp_granularities[]", "segment"),
              ('odd"name', "line\r\nbreak")]
    body = MultipartBody(fields, "file", Upload(io.BytesIO(audio), len(audio), 'my "talk".wav', "audio/wav"))
    raw = b"".join(body)
    assert len(raw) == len(body)
    _, form, files = parse_form_data({"wsgi.input": io.BytesIO(raw), "CONTENT_LENGTH": str(len(raw)),
                                      "CONTENT_TYPE": body.content_type, "REQUEST_METHOD": "POST"})
    assert form.getlist("timestamp_granularities[]") == ["word", "segment"] and form["model"] == "whisper"
    assert form['odd"name'] == "line\r\nbreak"  # the quote escaped as browsers do, and read back
    assert files["file"].read() == audio and files["file"].filename == 'my "talk".wav'
