"""The fakes' reranking, speech recognition, speech and image models: Workers AI's, speaking each model's
documented input and output (cloudflare-docs' workers-ai-models/*.json: bge-reranker-base, whisper,
whisper-large-v3-turbo, melotts, aura-1, flux-1-schnell, stable-diffusion-xl-base-1.0), and an
OpenAI-compatible upstream's /rerank, /audio/transcriptions, /audio/speech and /images/generations.

What they answer is made from what they were sent, so a test can tell that it arrived whole: a
"transcription" names the audio's size and SHA-256 (and the WAV's rate and length, when it is one), a
speech file holds its text, an image has the size asked for and a colour taken from its prompt."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import wave
from typing import Any

from PIL import Image

from tests.fake_http import WireHandler

RERANKER = "@cf/baai/bge-reranker-base"
WHISPER, WHISPER_TURBO = "@cf/openai/whisper", "@cf/openai/whisper-large-v3-turbo"
MELOTTS, AURA = "@cf/myshell-ai/melotts", "@cf/deepgram/aura-1"
FLUX, SDXL = "@cf/black-forest-labs/flux-1-schnell", "@cf/stabilityai/stable-diffusion-xl-base-1.0"
MODELS = {RERANKER, WHISPER, WHISPER_TURBO, MELOTTS, AURA, FLUX, SDXL}
AURA_SPEAKERS = {"angus", "asteria", "arcas", "orion", "orpheus", "athena", "luna", "zeus", "perseus", "helios",
                 "hera", "stella"}
AURA_ENCODINGS = {"linear16", "flac", "mulaw", "alaw", "mp3", "opus", "aac"}
MP3_HEAD = b"ID3\x04\x00\x00\x00\x00\x00\x00"


def heard(audio: bytes) -> str:
    """What the fake speech recognition "hears" in ``audio``."""
    said = f"audio of {len(audio)} bytes sha {hashlib.sha256(audio).hexdigest()[:16]}"
    try:
        with wave.open(io.BytesIO(audio)) as w:
            return f"{said}, a wav of {w.getnframes()} frames at {w.getframerate()} Hz."
    except (wave.Error, EOFError):
        return said + "."


def score(query: str, text: str) -> float:
    """Relevance: the query's words the text holds, a little less for a longer text."""
    words = set(query.lower().split())
    return len(words & set(text.lower().replace(".", " ").split())) - len(text) / 10_000


def png(width: int, height: int, prompt: str) -> bytes:
    colour = tuple(hashlib.sha256(prompt.encode()).digest()[:3])
    out = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(out, "PNG")
    return out.getvalue()


def wav(text: str, rate: int = 24000) -> bytes:
    """A real WAV file, as long as the text (a millisecond a character), of silence."""
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(b"\0\0" * (rate * len(text) // 1000))
    return out.getvalue()


def bad_input(handler: WireHandler, what: str) -> None:
    handler.send_json(400, {"errors": [{"message": f"AiError: Bad input: {what}", "code": 5006}], "success": False,
                            "result": {}, "messages": []})


def envelope(result: Any) -> dict[str, Any]:
    return {"result": result, "success": True, "errors": [], "messages": []}


def send_file(handler: WireHandler, content_type: str, data: bytes, pieces: int = 3) -> None:
    """A binary answer in several HTTP chunks (so that it can be passed on as it arrives)."""
    handler.send_response(200)
    handler.send_header("Content-Type", content_type)
    handler.send_header("Transfer-Encoding", "chunked")
    handler.end_headers()
    step = max(1, -(-len(data) // pieces))
    for i in range(0, len(data), step):
        handler.chunk(data[i:i + step])
    handler.end_chunks()


# -- Workers AI -------------------------------------------------------------------------------------------

def answer_workers_ai(handler: WireHandler, model: str, raw: bytes) -> None:
    """One `/ai/run/{model}` call of a model of MODELS; a body its schema refuses is a 400 with code 5006."""
    if model == WHISPER:  # the audio file as the body (or {"audio": [bytes as numbers]})
        try:
            body = json.loads(raw)
            audio = bytes(body["audio"]) if isinstance(body, dict) else raw
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            audio = raw
        if not audio:
            return bad_input(handler, "Type mismatch of '/', 'string' not in 'binary'")
        text = heard(audio)
        words = [{"word": w, "start": i * 0.5, "end": i * 0.5 + 0.4} for i, w in enumerate(text.split())]
        return handler.send_json(200, envelope({"text": text, "word_count": len(words), "words": words,
                                                "vtt": "WEBVTT\n\n"}))
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    if not isinstance(body, dict):
        return bad_input(handler, "Type mismatch of '/', 'string' not in 'object'")
    if model == RERANKER:
        return rerank(handler, body)
    if model == WHISPER_TURBO:
        return transcribe_turbo(handler, body)
    if model == MELOTTS:
        if not isinstance(body.get("prompt"), str) or not body["prompt"]:
            return bad_input(handler, "required properties at '/' are 'prompt'")
        audio = MP3_HEAD + f"melotts {body.get('lang', 'en')}: {body['prompt']}".encode()
        return handler.send_json(200, envelope({"audio": base64.b64encode(audio).decode()}))
    if model == AURA:
        return speak_aura(handler, body)
    if model == FLUX:
        extra = sorted(set(body) - {"prompt", "steps"})
        if extra:
            return bad_input(handler, f"Additional or unevaluated properties '{', '.join('/' + e for e in extra)}' "
                                      "at '/' not allowed")
        if not isinstance(body.get("prompt"), str) or not 1 <= len(body["prompt"]) <= 2048:
            return bad_input(handler, "required properties at '/' are 'prompt'")
        return handler.send_json(200, envelope({"image": base64.b64encode(png(1024, 1024, body["prompt"])).decode()}))
    if model == SDXL:
        width, height = body.get("width", 1024), body.get("height", 1024)
        if not isinstance(body.get("prompt"), str) or not body["prompt"]:
            return bad_input(handler, "required properties at '/' are 'prompt'")
        if not all(isinstance(x, int) and 256 <= x <= 2048 for x in (width, height)):
            return bad_input(handler, "Value out of range at '/width'")
        return send_file(handler, "image/png", png(width, height, body["prompt"]))
    raise AssertionError(model)


def rerank(handler: WireHandler, body: dict[str, Any]) -> None:
    query, contexts = body.get("query"), body.get("contexts")
    if not isinstance(query, str) or not query or not isinstance(contexts, list) or not all(
            isinstance(c, dict) and isinstance(c.get("text"), str) and c["text"] for c in contexts):
        return bad_input(handler, "required properties at '/' are 'query', 'contexts'")
    scored = [(i, score(query, c["text"])) for i, c in enumerate(contexts)]
    top_k = body.get("top_k")
    if isinstance(top_k, int):  # the best top_k, in the request's order (aigate sorts them)
        best = {i for i, _ in sorted(scored, key=lambda s: -s[1])[:top_k]}
        scored = [s for s in scored if s[0] in best]
    handler.send_json(200, envelope({"response": [{"id": i, "score": s} for i, s in scored]}))


def transcribe_turbo(handler: WireHandler, body: dict[str, Any]) -> None:
    try:
        audio = base64.b64decode(body["audio"], validate=True)
    except (KeyError, TypeError, ValueError):
        return handler.send_json(400, {"errors": [{"message": "AiError: Invalid data type for base64 input",
                                                   "code": 5004}], "success": False})
    text = heard(audio) + (f" Prompted: {body['initial_prompt']}" if body.get("initial_prompt") else "")
    words = text.split()
    segments = [{"start": i * 2.0, "end": i * 2.0 + 1.5, "text": " ".join(words[i * 4:i * 4 + 4]), "temperature": 0,
                 "avg_logprob": -0.25, "compression_ratio": 1.2, "no_speech_prob": 0.01,
                 "words": [{"word": w, "start": i * 2.0 + j * 0.4, "end": i * 2.0 + j * 0.4 + 0.3}
                           for j, w in enumerate(words[i * 4:i * 4 + 4])]}
                for i in range(-(-len(words) // 4))]
    handler.send_json(200, envelope({
        "text": text, "word_count": len(words), "segments": segments, "vtt": "WEBVTT\n\n",
        "transcription_info": {"language": body.get("language", "en"), "language_probability": 0.99,
                               "duration": segments[-1]["end"], "duration_after_vad": segments[-1]["end"]}}))


def speak_aura(handler: WireHandler, body: dict[str, Any]) -> None:
    text, speaker = body.get("text"), body.get("speaker", "angus")
    encoding, container = body.get("encoding", "mp3"), body.get("container", "none")
    if not isinstance(text, str) or speaker not in AURA_SPEAKERS or encoding not in AURA_ENCODINGS \
            or container not in ("none", "wav", "ogg"):
        return bad_input(handler, "Value not in enum at '/speaker'")
    if encoding == "linear16" and container == "wav":
        data = wav(text, body.get("sample_rate", 24000))
    else:
        data = (MP3_HEAD if encoding == "mp3" else encoding.encode() + b":") + f"aura {speaker}: {text}".encode()
    send_file(handler, "audio/mpeg", data)


# -- an OpenAI-compatible upstream ------------------------------------------------------------------------

UPSTREAM_PATHS = ("/rerank", "/audio/transcriptions", "/audio/speech", "/images/generations")


def upstream_serves(path: str) -> bool:
    return path.endswith(UPSTREAM_PATHS)


def answer_upstream(handler: Any, mode: str | None) -> None:
    """One call of an OpenAI-compatible server (``handler.record`` keeps what it was sent); a model
    `fake-500` (or the fake's ``mode``) fails, `fake-400` refuses, `fake-404` has no such endpoint, `fake-307`
    redirects, `fake-huge` answers 100 MB."""
    raw = handler.rfile.read(int(handler.headers.get("Content-Length", 0)))
    if handler.path.endswith("/audio/transcriptions"):
        from werkzeug.formparser import parse_form_data

        environ = {"wsgi.input": io.BytesIO(raw), "CONTENT_LENGTH": str(len(raw)), "REQUEST_METHOD": "POST",
                   "CONTENT_TYPE": handler.headers.get("Content-Type", "")}
        _, form, files = parse_form_data(environ)
        audio = files["file"].read() if "file" in files else b""
        body: dict[str, Any] = {"form": [(k, v) for k in form for v in form.getlist(k)],
                                "file": (files["file"].filename, len(audio)) if "file" in files else None}
    else:
        body = json.loads(raw)
    handler.record(body)
    model = dict(body["form"]).get("model", "") if "form" in body else body.get("model", "")
    mode = mode or model.removeprefix("fake-")
    if mode == "500":
        return handler.send_json(500, {"error": {"message": "the GPU fell over", "type": "server_error"}})
    if mode == "400":
        return handler.send_json(400, {"error": {"message": "this model takes no such input", "type": "invalid"}})
    if mode == "404":  # a server without the endpoint (FastAPI's answer, as vLLM's)
        return handler.send_json(404, {"detail": "Not Found"})
    if mode == "307":  # moved: to ``redirect_to``, which a client that follows it would send the request to
        return handler.redirect(307, handler.state.redirect_to + handler.path)
    if mode == "huge":  # an answer of 100 MB
        return handler.huge_body(200, b"", b"")
    if handler.path.endswith("/rerank"):
        scored = [{"index": i, "relevance_score": score(body["query"], d)} for i, d in enumerate(body["documents"])]
        return handler.send_json(200, {"model": model, "results": scored, "usage": {"total_tokens": 42}})
    if handler.path.endswith("/audio/transcriptions"):
        text = "upstream heard " + heard(audio)
        fmt = dict(body["form"]).get("response_format", "json")
        if fmt in ("text", "srt", "vtt"):
            data = text.encode()
            handler.send_response(200)
            handler.send_header("Content-Type", "text/plain; charset=utf-8")
            handler.send_header("Content-Length", str(len(data)))
            handler.end_headers()
            return handler.wfile.write(data)
        return handler.send_json(200, {"text": text})
    if handler.path.endswith("/audio/speech"):
        return send_file(handler, "audio/mpeg", MP3_HEAD + f"upstream {body.get('voice')}: {body['input']}".encode())
    image = base64.b64encode(png(64, 64, body["prompt"])).decode()
    handler.send_json(200, {"created": 1, "data": [{"b64_json": image} for _ in range(body.get("n") or 1)]})
