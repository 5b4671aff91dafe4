"""Reranking, speech recognition, speech and image generation through a real gunicorn: the `openai` SDK's
own calls (and `requests` for /v1/rerank, which the SDK has not), against the fake Workers AI speaking
each model's documented format and a fake OpenAI-compatible upstream that serves them; errors mapped,
keys, model permissions and limits as on chat."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import wave
from pathlib import Path

import openai
import pytest
import requests
from PIL import Image

from tests.conftest import start_server
from tests.fake_cloudflare import cloudflare_env
from tests.fake_media import AURA, FLUX, MELOTTS, MP3_HEAD, RERANKER, SDXL, WHISPER, WHISPER_TURBO, heard
from tests.fake_upstream import FakeUpstream

ALL, NARROW = "sk-media-all", "sk-media-narrow"
KEYS = f"""
[keys.all]
key = "{ALL}"

[keys.narrow]
key = "{NARROW}"
models = ["{RERANKER}"]
requests_per_minute = 3
"""
UP_MODELS = ["up-rerank", "up-whisper", "up-tts", "up-image", "fake-500", "fake-400", "fake-404", "fake-307",
             "fake-huge"]
MAX_UPLOAD = 200_000
MB = 1024 * 1024
DOCUMENTS = ["Paris is the capital of France.", "The cat sat on the mat.", "France exports wine and cheese.",
             "Bananas are yellow."]


def wav_file(seconds: float = 0.25, rate: int = 16000) -> bytes:
    """A short WAV (a tone), written with the standard library."""
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        tone = b"".join((i * 512).to_bytes(2, "little") for i in range(64))  # a sawtooth, 64 frames a period
        frames = int(rate * seconds)
        w.writeframes((tone * (frames // 64 + 1))[:frames * 2])
    return out.getvalue()


AUDIO = wav_file()


@pytest.fixture(scope="module")
def upstream():
    fake = FakeUpstream(models=UP_MODELS).start()
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory, fake, upstream, demo_model):
    tmp = tmp_path_factory.mktemp("media")
    (tmp / "keys.toml").write_text(KEYS)
    (tmp / "keys.toml").chmod(0o600)
    (tmp / "upstreams.toml").write_text(f'[upstreams.up]\nbase_url = "{upstream.base}"\n'
                                        f'models = {json.dumps(UP_MODELS)}\n')
    server = start_server(tmp, {
        "CHATGLM_MODEL": str(demo_model), "CHATGLM_MODEL_ID": "local", **cloudflare_env(fake),
        "CLOUDFLARE_MODELS": "@cf/fake/chat", "CLOUDFLARE_RETRIES": "0",
        "CLOUDFLARE_RERANK_MODELS": f"{RERANKER},@cf/fake/500",
        "CLOUDFLARE_IMAGE_MODELS": f"{FLUX},{SDXL},@cf/fake/5006",
        "API_KEYS_FILE": str(tmp / "keys.toml"), "UPSTREAMS_FILE": str(tmp / "upstreams.toml"),
        "MODEL_ALIASES": f"whisper-1={WHISPER_TURBO},tts-1={AURA}", "MAX_UPLOAD_BYTES": str(MAX_UPLOAD)})
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.v1, api_key=ALL, max_retries=0)


def rerank(server, body: dict, key: str = ALL, path: str = "/v1/rerank") -> requests.Response:
    return requests.post(server.base_url + path, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=30)


# -- reranking ---------------------------------------------------------------------------------------------

def test_rerank_on_workers_ai_scores_every_document_best_first(server, fake):
    r = rerank(server, {"model": RERANKER, "query": "capital of France", "documents": DOCUMENTS})
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["model"] == RERANKER and answer["object"] == "list" and answer["id"].startswith("rerank-")
    assert [x["index"] for x in answer["results"]] == [0, 2, 3, 1]  # the fake answers in the request's order
    assert [x["document"]["text"] for x in answer["results"]] == [DOCUMENTS[i] for i in (0, 2, 3, 1)]
    scores = [x["relevance_score"] for x in answer["results"]]
    assert scores == sorted(scores, reverse=True)
    assert answer["usage"]["total_tokens"] > 0
    sent = fake.runs(RERANKER)[-1].body
    assert sent == {"query": "capital of France", "contexts": [{"text": d} for d in DOCUMENTS]}
    assert f"path=/v1/rerank status=200 client=127.0.0.1 key=all model={RERANKER} backend=cloudflare" in \
        server.wait_for_log("path=/v1/rerank status=200")


@pytest.mark.parametrize("path", ["/v1/reranking", "/rerank", "/v1/rerank/"])
def test_rerank_top_n_objects_and_the_paths_other_servers_use(server, fake, path):
    r = rerank(server, {"model": RERANKER, "query": "France", "documents": [{"text": d} for d in DOCUMENTS],
                        "top_n": 2, "return_documents": False}, path=path)
    assert r.status_code == 200, r.text
    assert [x["index"] for x in r.json()["results"]] == [0, 2]
    assert all(set(x) == {"index", "relevance_score"} for x in r.json()["results"])
    assert fake.runs(RERANKER)[-1].body["top_k"] == 2


def test_rerank_on_an_upstream_is_passed_on_and_normalised(server, upstream):
    r = rerank(server, {"model": "up-rerank", "query": "France wine", "documents": [{"text": d} for d in DOCUMENTS],
                        "top_n": 3, "instruction": "passed on"})
    assert r.status_code == 200, r.text
    answer = r.json()
    assert [x["index"] for x in answer["results"]] == [2, 0, 3]
    assert answer["results"][0]["document"] == {"text": DOCUMENTS[2]}
    assert answer["usage"] == {"prompt_tokens": 42, "total_tokens": 42}  # the upstream's own count
    sent = upstream.posts()[-1]
    assert sent["path"] == "/v1/rerank"
    assert sent["body"] == {"model": "up-rerank", "query": "France wine", "documents": DOCUMENTS, "top_n": 3,
                            "instruction": "passed on"}  # the documents as strings, which every server takes


@pytest.mark.parametrize(("body", "status", "code", "param"), [
    ({"model": "@cf/fake/500", "query": "q", "documents": ["d"]}, 502, "upstream_error", None),
    ({"model": "fake-500", "query": "q", "documents": ["d"]}, 502, "upstream_error", None),
    ({"model": "fake-400", "query": "q", "documents": ["d"]}, 400, "upstream_bad_request", None),
    ({"model": "@cf/fake/chat", "query": "q", "documents": ["d"]}, 400, "model_not_supported", "model"),
    ({"model": "local", "query": "q", "documents": ["d"]}, 400, "model_not_supported", "model"),
    ({"model": "nope", "query": "q", "documents": ["d"]}, 404, "model_not_found", "model"),
    ({"model": RERANKER, "documents": ["d"]}, 400, "missing_required_parameter", "query"),
    ({"model": RERANKER, "query": "q", "documents": []}, 400, "empty_array", "documents"),
    ({"model": RERANKER, "query": "q", "documents": ["d"], "top_n": 0}, 400, "invalid_value", "top_n"),
])
def test_rerank_errors(server, body, status, code, param):
    r = rerank(server, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert (error["code"], error["param"]) == (code, param), error
    if code == "model_not_supported":
        assert f"does not support reranking (POST /v1/rerank); models that do: {RERANKER}, @cf/fake/500" in \
            error["message"]


def test_an_upstream_without_the_endpoint_is_a_400_not_a_failing_upstream(server):
    errors = requests.get(server.base_url + "/ready", timeout=10).json()["upstreams"]["up"]["errors"]
    r = rerank(server, {"model": "fake-404", "query": "q", "documents": ["d"]})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "model_not_supported" and "does not serve this endpoint" in r.text
    assert requests.get(server.base_url + "/ready", timeout=10).json()["upstreams"]["up"]["errors"] == errors


def test_rerank_takes_the_keys_their_models_and_their_request_limits(server):
    body = {"model": RERANKER, "query": "q", "documents": ["d"]}
    assert rerank(server, body, key="sk-wrong").status_code == 401
    assert requests.post(server.v1 + "/rerank", json=body, timeout=10).json()["error"]["code"] == "invalid_api_key"
    narrow = rerank(server, {**body, "model": "up-rerank"}, key=NARROW)  # not one of the key's models
    assert narrow.status_code == 404 and narrow.json()["error"]["code"] == "model_not_found"
    statuses = [rerank(server, body, key=NARROW).status_code for _ in range(3)]  # 3 a minute, one spent above
    assert statuses == [200, 200, 429]


# -- speech recognition ------------------------------------------------------------------------------------

def test_transcription_through_whisper_large_v3_turbo_in_every_format(client, fake):
    said = heard(AUDIO) + " Prompted: aigate"
    text = client.audio.transcriptions.create(model="whisper-1", file=("hello.wav", AUDIO), prompt="aigate",
                                              language="de")
    assert text.text == said
    sent = fake.runs(WHISPER_TURBO)[-1].body  # base64 in JSON, streamed: it arrives whole
    assert base64.b64decode(sent["audio"]) == AUDIO and sent["language"] == "de" and sent["initial_prompt"] == "aigate"
    assert client.audio.transcriptions.create(model=WHISPER_TURBO, file=("a.wav", AUDIO), response_format="text") \
        == heard(AUDIO) + "\n"
    srt = client.audio.transcriptions.create(model=WHISPER_TURBO, file=("a.wav", AUDIO), response_format="srt")
    assert srt.startswith("1\n00:00:00,000 --> 00:00:01,500\naudio of ") and "\n\n2\n00:00:02,000 --> " in srt
    vtt = client.audio.transcriptions.create(model=WHISPER_TURBO, file=("a.wav", AUDIO), response_format="vtt")
    assert vtt.startswith("WEBVTT\n\n00:00:00.000 --> 00:00:01.500\naudio of ")
    verbose = client.audio.transcriptions.create(model=WHISPER_TURBO, file=("a.wav", AUDIO), language="fr",
                                                 response_format="verbose_json", timestamp_granularities=["word"])
    assert verbose.text == heard(AUDIO) and verbose.language == "fr" and verbose.duration > 0
    assert " ".join(s.text for s in verbose.segments) == verbose.text
    assert [w.word for w in verbose.words or []] == verbose.text.split()


def test_transcription_through_whisper_sends_the_file_itself(client, fake):
    verbose = client.audio.transcriptions.create(model=WHISPER, file=("a.wav", AUDIO), response_format="verbose_json")
    assert verbose.text == heard(AUDIO) and "a wav of 4000 frames at 16000 Hz" in verbose.text
    words = verbose.text.split()  # Whisper gives words only: a segment is made of them, to a sentence's end
    assert [(s.start, s.end, s.text) for s in verbose.segments] == [(0.0, 0.5 * (len(words) - 1) + 0.4, verbose.text)]
    srt = client.audio.transcriptions.create(model=WHISPER, file=("a.wav", AUDIO), response_format="srt")
    assert srt == f"1\n00:00:00,000 --> 00:00:06,900\n{verbose.text}\n\n"
    run = fake.runs(WHISPER)[-1]
    assert run.body is None and run.headers["Content-Type"] == "application/octet-stream"
    assert int(run.headers["Content-Length"]) == len(AUDIO)


def test_transcription_on_an_upstream_is_passed_on_as_it_answers(client, upstream):
    text = client.audio.transcriptions.create(model="up-whisper", file=("talk.wav", AUDIO), response_format="text",
                                              language="en", timestamp_granularities=["word", "segment"])
    assert text == "upstream heard " + heard(AUDIO)
    sent = upstream.posts()[-1]
    assert sent["path"] == "/v1/audio/transcriptions" and sent["body"]["file"] == ("talk.wav", len(AUDIO))
    form = sent["body"]["form"]
    assert ("model", "up-whisper") in form and ("language", "en") in form and ("response_format", "text") in form
    assert [v for k, v in form if k == "timestamp_granularities[]"] == ["word", "segment"]
    assert client.audio.transcriptions.create(model="up-whisper", file=AUDIO).text == "upstream heard " + heard(AUDIO)


def test_transcription_errors(client, server):
    with pytest.raises(openai.APIStatusError) as err:  # over MAX_UPLOAD_BYTES: refused unread
        client.audio.transcriptions.create(model=WHISPER, file=("big.wav", b"\0" * (MAX_UPLOAD + 1)))
    assert err.value.status_code == 413 and err.value.code == "request_too_large"
    assert "MAX_UPLOAD_BYTES" in err.value.message
    cases = [
        (dict(model=WHISPER, file=("a.wav", AUDIO), response_format="mp3"), "invalid_value", "response_format"),
        (dict(model=WHISPER, file=("a.wav", b"")), "invalid_value", "file"),
        (dict(model=WHISPER, file=("a.wav", AUDIO), stream=True), "model_not_supported", "stream"),
        (dict(model="@cf/fake/chat", file=("a.wav", AUDIO)), "model_not_supported", "model"),
        (dict(model=WHISPER, file=("a.wav", AUDIO), temperature=3), "invalid_value", "temperature"),
    ]
    for kwargs, code, param in cases:
        with pytest.raises(openai.BadRequestError) as bad:
            client.audio.transcriptions.create(**kwargs)
        assert (bad.value.code, bad.value.param) == (code, param), bad.value.message
    auth = {"Authorization": f"Bearer {ALL}"}
    r = requests.post(server.v1 + "/audio/transcriptions", json={"model": WHISPER}, headers=auth, timeout=10)
    assert r.status_code == 400 and "expected multipart/form-data" in r.json()["error"]["message"]
    r = requests.post(server.v1 + "/audio/transcriptions", data={"model": WHISPER}, files={"other": b"x"},
                      headers=auth, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "file"
    r = requests.post(server.v1 + "/audio/transcriptions", data={"model": WHISPER}, files={"file": AUDIO}, timeout=10)
    assert r.status_code == 401
    # A part whose Content-Disposition werkzeug cannot read (`name="odd\"`: the closing quote escaped) has no
    # name: it is no field of ours and is left out, not a 500 (schemathesis found this one).
    boundary = "b0undary"
    part = f'--{boundary}\r\nContent-Disposition: form-data; name="{{}}"\r\n\r\n{{}}\r\n'
    body = (part.format('odd\\', "{}") + part.format("model", WHISPER)
            + f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n').encode()
    body += AUDIO + f"\r\n--{boundary}--\r\n".encode()
    r = requests.post(server.v1 + "/audio/transcriptions", data=body, timeout=10,
                      headers={**auth, "Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert r.status_code == 200 and r.json()["text"] == heard(AUDIO), r.text


# -- speech ------------------------------------------------------------------------------------------------

def test_speech_through_melotts_and_aura(client, fake):
    melo = client.audio.speech.create(model=MELOTTS, voice="fr", input="Bonjour tout le monde")
    assert melo.content == MP3_HEAD + b"melotts fr: Bonjour tout le monde"
    assert melo.response.headers["Content-Type"] == "audio/mpeg"
    assert fake.runs(MELOTTS)[-1].body == {"prompt": "Bonjour tout le monde", "lang": "fr"}
    aura = client.audio.speech.create(model="tts-1", voice="alloy", input="Hello there", response_format="wav")
    assert aura.response.headers["Content-Type"] == "audio/wav"
    with wave.open(io.BytesIO(aura.content)) as w:  # a real WAV, as Aura makes it (linear16 in a wav container)
        assert w.getframerate() == 24000 and w.getnframes() == 24000 * len("Hello there") // 1000
    assert fake.runs(AURA)[-1].body == {"text": "Hello there", "encoding": "linear16", "container": "wav"}
    luna = client.audio.speech.create(model=AURA, voice="luna", input="Hi", response_format="opus")
    assert luna.content == b"opus:aura luna: Hi" and luna.response.headers["Content-Type"] == "audio/ogg"


def test_speech_on_an_upstream_is_passed_on(client, upstream):
    audio = client.audio.speech.create(model="up-tts", voice="alloy", input="Hello", speed=1.5)
    assert audio.content == MP3_HEAD + b"upstream alloy: Hello"
    assert upstream.posts()[-1]["body"] == {"model": "up-tts", "voice": "alloy", "input": "Hello", "speed": 1.5}


def test_an_upstream_s_audio_is_cut_at_the_media_bound(server):
    """100 MB of "speech": passed on as it comes, up to UPSTREAM_MAX_MEDIA_BYTES (32 MiB), then the connection
    ends, with one line in the log and no traceback."""
    received, logged = 0, len(server.log)
    with requests.post(server.v1 + "/audio/speech", headers={"Authorization": f"Bearer {ALL}"}, stream=True,
                       timeout=60, json={"model": "fake-huge", "voice": "alloy", "input": "Hello"}) as r:
        assert r.status_code == 200  # its first piece had come: the failure is past the headers
        with pytest.raises(requests.exceptions.ChunkedEncodingError):
            for piece in r.iter_content(1 << 20):
                received += len(piece)
    assert 30 * MB < received <= 32 * MB
    with server.changed:  # the request's line, written when the connection has closed
        assert server.changed.wait_for(lambda: any("path=/v1/audio/speech" in line and "error=upstream_error" in line
                                                   for line in server.log[logged:]), 10), server.log[logged:]
    assert any("broke off after its first bytes" in line for line in server.log[logged:])
    assert not any("Traceback" in line for line in server.log[logged:]), server.log[logged:]


def test_a_redirect_of_an_upstream_s_media_endpoint_is_not_followed(server, upstream):
    elsewhere = FakeUpstream(models=[]).start()
    upstream.redirect_to = f"http://127.0.0.1:{elsewhere.port}"
    try:
        r = requests.post(server.v1 + "/rerank", headers={"Authorization": f"Bearer {ALL}"}, timeout=30,
                          json={"model": "fake-307", "query": "q", "documents": DOCUMENTS})
        assert (r.status_code == 502
                and "upstream up answered with a redirect (HTTP 307)" in r.json()["error"]["message"])
        assert elsewhere.requests == []
    finally:
        elsewhere.stop()


@pytest.mark.parametrize(("kwargs", "status", "code", "param"), [
    (dict(model=MELOTTS, voice="en", input="x", response_format="wav"), 400, "model_not_supported", "response_format"),
    (dict(model=AURA, voice="nobody", input="x"), 400, "upstream_bad_request", None),
    (dict(model=AURA, voice="luna", input=""), 400, "invalid_value", "input"),
    (dict(model=AURA, voice="luna", input="x", response_format="ogg"), 400, "invalid_value", "response_format"),
    (dict(model=AURA, voice="luna", input="x", stream_format="sse"), 400, "model_not_supported", "stream_format"),
    (dict(model=WHISPER, voice="luna", input="x"), 400, "model_not_supported", "model"),
    (dict(model="fake-500", voice="luna", input="x"), 502, "upstream_error", None),
])
def test_speech_errors(client, kwargs, status, code, param):
    with pytest.raises(openai.APIStatusError) as err:
        client.audio.speech.create(**kwargs)
    assert (err.value.status_code, err.value.code, err.value.param) == (status, code, param), err.value.message


# -- images ------------------------------------------------------------------------------------------------

def image_of(b64: str | None) -> Image.Image:
    assert b64 is not None
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_images_through_flux_and_stable_diffusion_xl(client, fake):
    flux = client.images.generate(model=FLUX, prompt="a red fox", size="512x512", response_format="b64_json")
    assert len(flux.data) == 1 and image_of(flux.data[0].b64_json).size == (1024, 1024)  # FLUX takes no size
    assert fake.runs(FLUX)[-1].body == {"prompt": "a red fox"}
    sdxl = client.images.generate(model=SDXL, prompt="a blue whale", size="512x768", n=2)
    assert [image_of(d.b64_json).size for d in sdxl.data] == [(512, 768), (512, 768)]
    assert image_of(sdxl.data[0].b64_json).getpixel((0, 0)) == tuple(hashlib.sha256(b"a blue whale").digest()[:3])
    assert fake.runs(SDXL)[-1].body == {"prompt": "a blue whale", "width": 512, "height": 768}


def test_images_on_an_upstream_are_passed_on(client, upstream):
    images = client.images.generate(model="up-image", prompt="a fox", n=2, quality="hd")
    assert [image_of(d.b64_json).size for d in images.data] == [(64, 64), (64, 64)]
    assert upstream.posts()[-1]["body"] == {"model": "up-image", "prompt": "a fox", "n": 2, "quality": "hd"}


@pytest.mark.parametrize(("kwargs", "status", "code", "param"), [
    (dict(model=FLUX, prompt="x", response_format="url"), 400, "unsupported_value", "response_format"),
    (dict(model=SDXL, prompt="x", size="100x100"), 400, "invalid_value", "size"),
    (dict(model=SDXL, prompt="x", n=11), 400, "invalid_value", "n"),
    (dict(model="@cf/fake/5006", prompt="x"), 400, "upstream_bad_request", None),
    (dict(model=RERANKER, prompt="x"), 400, "model_not_supported", "model"),
    (dict(model="fake-400", prompt="x"), 400, "upstream_bad_request", None),
])
def test_image_errors(client, kwargs, status, code, param):
    with pytest.raises(openai.APIStatusError) as err:
        client.images.generate(**kwargs)
    assert (err.value.status_code, err.value.code, err.value.param) == (status, code, param), err.value.message


def test_models_say_what_each_serves(client):
    tasks = {m.id: (m.model_extra or {})["capabilities"]["tasks"] for m in client.models.list()}
    assert tasks["local"] == ["chat"] and tasks["@cf/fake/chat"] == ["chat"]
    assert (tasks[RERANKER] == ["rerank"] and tasks[WHISPER] == ["transcription"]
            and tasks["whisper-1"] == ["transcription"])
    assert tasks[MELOTTS] == ["speech"] and tasks[SDXL] == ["image_generation"]
    assert tasks["up-rerank"] is None  # an upstream's: its server decides


# -- a large upload: streamed, never held whole --------------------------------------------------------------

def peak_rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_a_large_upload_is_streamed_to_workers_ai_not_held_in_memory(tmp_path_factory, fake):
    server = start_server(tmp_path_factory.mktemp("upload"), {**cloudflare_env(fake), "API_KEYS": ALL,
                                                              "CLOUDFLARE_MODELS": "@cf/fake/chat"})
    try:
        client = openai.OpenAI(base_url=server.v1, api_key=ALL, max_retries=0)
        client.audio.transcriptions.create(model=WHISPER_TURBO, file=("warm.wav", AUDIO))  # every import done
        pid = int(Path(f"/proc/{server.process.pid}/task/{server.process.pid}/children").read_text().split()[0])
        before = peak_rss_kb(pid)
        audio = wav_file(seconds=500)  # 16 MB: over MAX_BODY_BYTES, under MAX_UPLOAD_BYTES
        text = client.audio.transcriptions.create(model=WHISPER_TURBO, file=("long.wav", audio))
        assert text.text == heard(audio)
        grown = (peak_rss_kb(pid) - before) / 1024
        # Held whole, the upload (16 MB), its base64 (21 MB) and the JSON around it would each be in memory.
        assert grown < 8, f"the worker's peak memory grew by {grown:.1f} MB for a {len(audio) / 2**20:.0f} MB upload"
        print(f"peak memory grew {grown:.1f} MB for a {len(audio) / 2**20:.1f} MB upload")
    finally:
        server.stop()
