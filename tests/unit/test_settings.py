import dataclasses
import importlib.util
from pathlib import Path

import pytest

from config.fields import declarations
from config.settings import ELSEWHERE, ConfigError, Settings, configuration_table, load_settings
from tests.conftest import ROOT


def test_defaults_without_environment():
    s = load_settings({}, dotenv=None)
    assert s.uses_demo_model and s.api_keys == () and (s.host, s.port, s.generation_slots) == ("127.0.0.1", 8000, 4)


def test_environment_wins_over_dotenv(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("API_KEYS=a, b\nMODEL=/models/x.bin\nPORT=9000\nMODEL_ALIASES=gpt-4o=x , gpt-3.5-turbo=x\n")
    s = load_settings({"PORT": "9100"}, dotenv=env_file)
    assert [k.secret for k in s.api_keys] == ["a", "b"]
    assert s.chatglm_model == Path("/models/x.bin")  # MODEL is an alias of CHATGLM_MODEL
    assert s.port == 9100
    assert s.model_aliases == (("gpt-4o", "x"), ("gpt-3.5-turbo", "x"))


def test_chatglm_model_wins_over_model():
    assert load_settings({"MODEL": "/a.bin", "CHATGLM_MODEL": "/b.bin"}, dotenv=None).chatglm_model == Path("/b.bin")


@pytest.mark.parametrize("env, name", [
    ({"PORT": "eighty"}, "PORT"),
    ({"WORKERS": "0"}, "WORKERS"),
    ({"QUEUE_TIMEOUT": "soon"}, "QUEUE_TIMEOUT"),
    ({"MODEL_ALIASES": "gpt-4o"}, "MODEL_ALIASES"),
    ({"MODEL_ALIASES": "=x"}, "MODEL_ALIASES"),
    ({"CHATGLM_MAX_LENGTH": "-5"}, "CHATGLM_MAX_LENGTH"),
    ({"RESPONSES_TTL": "10"}, "RESPONSES_TTL"),
    ({"RESPONSES_MAX_MB": "lots"}, "RESPONSES_MAX_MB"),
])
def test_bad_values_name_the_variable(env, name):
    with pytest.raises(ConfigError) as err:
        load_settings(env, dotenv=None)
    assert str(err.value).startswith(name)


def test_cloudflare_needs_both_account_and_token():
    with pytest.raises(ConfigError, match="CLOUDFLARE_API_TOKEN"):
        load_settings({"CLOUDFLARE_ACCOUNT_ID": "abc"}, dotenv=None)
    with pytest.raises(ConfigError, match="CLOUDFLARE_ACCOUNT_ID"):
        load_settings({"CLOUDFLARE_API_TOKEN": "t"}, dotenv=None)


def test_cloudflare_settings():
    s = load_settings({"CLOUDFLARE_ACCOUNT_ID": "a", "CLOUDFLARE_API_TOKEN": "t", "CLOUDFLARE_TIMEOUT": "3,30",
                       "CLOUDFLARE_MODELS": "@cf/x/y, @hf/z"}, dotenv=None)
    assert s.uses_cloudflare and not s.uses_demo_model and s.model_path is None
    assert s.cloudflare_timeout == (3.0, 30.0) and s.cloudflare_models == ("@cf/x/y", "@hf/z")
    assert load_settings({"CLOUDFLARE_TIMEOUT": "60"}, dotenv=None).cloudflare_timeout == (10.0, 60.0)
    with pytest.raises(ConfigError, match="CLOUDFLARE_TIMEOUT"):
        load_settings({"CLOUDFLARE_TIMEOUT": "soon"}, dotenv=None)


def test_request_limits_from_the_environment():
    s = load_settings({"MAX_MESSAGES": "10", "MAX_INPUT_CHARS": "5000", "MAX_TOKENS_CEILING": "256"}, dotenv=None)
    assert (s.max_messages, s.max_input_chars, s.max_tokens_ceiling) == (10, 5000, 256)
    assert load_settings({}, dotenv=None).max_tokens_ceiling is None
    s = load_settings({"MAX_TOKENS_CEILING": "1024, @cf/meta/llama-3.1-8b-instruct-fast=256"}, dotenv=None)
    assert (s.max_tokens_ceiling, s.max_tokens_by_model) == (1024, (("@cf/meta/llama-3.1-8b-instruct-fast", 256),))
    with pytest.raises(ConfigError, match="MAX_TOKENS_CEILING: 'm=lots' is not a number or model=number"):
        load_settings({"MAX_TOKENS_CEILING": "m=lots"}, dotenv=None)


def test_stored_responses_and_json_mode_settings(tmp_path):
    s = load_settings({"STATE_DIR": str(tmp_path), "RESPONSES_TTL": "3600", "RESPONSES_MAX_MB": "5",
                       "CLOUDFLARE_JSON_MODELS": "@cf/a, @cf/b"}, dotenv=None)
    assert (s.state_dir, s.responses_ttl, s.responses_max_mb) == (tmp_path, 3600, 5)
    assert s.cloudflare_json_models == ("@cf/a", "@cf/b")
    assert "@cf/meta/llama-3.3-70b-instruct-fp8-fast" in load_settings({}, dotenv=None).cloudflare_json_models


def test_defaults_are_the_declared_ones():
    """One place for a default: reading an empty environment gives the dataclass's own."""
    assert load_settings({}, dotenv=None) == Settings()


def test_every_setting_is_declared_once():
    declared = declarations(Settings)
    assert [f.name for f, _ in declared] == [f.name for f in dataclasses.fields(Settings)]
    listed = [d.env for _, d in declared if d.listed] + [d.env for d in ELSEWHERE]
    assert len(listed) == len(set(listed))
    assert all(d.doc for _, d in declared if d.listed)


@pytest.mark.parametrize("env, minimum", [(d.env, d.minimum) for _, d in declarations(Settings)
                                          if d.minimum is not None])
def test_each_declared_bound_is_enforced(env, minimum):
    below = f"{minimum - 1:g}"
    with pytest.raises(ConfigError, match=rf"^{env}=.* is too small \(at least {minimum:g}\)"):
        load_settings({env: below}, dotenv=None)
    assert getattr(load_settings({env: f"{minimum:g}"}, dotenv=None), _field_of(env)) == minimum


def _field_of(env: str) -> str:
    return next(f.name for f, d in declarations(Settings) if d.env == env)


def test_flags_take_yes_and_no_only():
    assert load_settings({"LOG_PROMPTS": "yes"}, dotenv=None).log_prompts is True
    with pytest.raises(ConfigError, match=r"^LOG_PROMPTS='maybe' is not a yes/no value"):
        load_settings({"LOG_PROMPTS": "maybe"}, dotenv=None)


def test_readme_table_is_written_from_the_declarations():
    script = _load_script("settings_table")
    table = script.written_table((ROOT / "docs" / "configuration.md").read_text())
    assert table == configuration_table(), "docs/configuration.md's settings table is stale: run `make settings-table`"
    assert "| `MAX_QUEUE` | requests waiting for a slot before new ones get 429 | `8` | `0` |" in table


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_checking_the_configuration_writes_nothing(tmp_path):
    """The demo model stands in but is not written yet: the check passes on what it will be, and
    leaves no file behind (starting writes it: app.ensure_demo_model)."""
    from app import check_config

    s = load_settings({"DEMO_MODEL_PATH": str(tmp_path / "demo.bin"), "MODEL_ALIASES": "gpt-4o=chatglm3-demo",
                       "MAX_TOKENS_CEILING": "gpt-4o=64"}, dotenv=None)
    (local,) = check_config(s)
    assert (local.id, local.context, local.file) == ("chatglm3-demo", 32768, None)
    assert check_config(dataclasses.replace(s, chatglm_max_length=32768)) == (local,)  # up to the model's own
    with pytest.raises(ConfigError, match=r"^CHATGLM_MAX_LENGTH=32769 is more than the model's own 32768"):
        check_config(dataclasses.replace(s, chatglm_max_length=32769))
    assert list(tmp_path.iterdir()) == []


def test_a_written_demo_model_is_read_and_checked(tmp_path):
    from app import check_config, ensure_demo_model
    from backends.chatglm.demo_model import write_demo_model

    demo_model = write_demo_model(tmp_path / "demo.bin")
    s = load_settings({"DEMO_MODEL_PATH": str(demo_model)}, dotenv=None)
    ensure_demo_model(s)  # there already: nothing to write
    (local,) = check_config(s)
    assert local.file is not None and local.file.path == demo_model


def test_a_demo_model_with_yesterdays_context_is_written_again(tmp_path):
    """An older aigate wrote the demo model with a 1,024-token context, too small for today's agents:
    the check takes it for the one start writes, and start writes that one over it."""
    from app import check_config, ensure_demo_model
    from backends.chatglm.demo_model import DEMO_MAX_LENGTH, write_demo_model
    from backends.chatglm.ggml_file import read_model_file

    old = write_demo_model(tmp_path / "demo.bin", max_length=1024)
    s = load_settings({"DEMO_MODEL_PATH": str(old), "CHATGLM_MAX_LENGTH": "32768"}, dotenv=None)
    (local,) = check_config(s)
    assert (local.context, local.file) == (32768, None)
    ensure_demo_model(s)
    assert read_model_file(old).config.max_length == DEMO_MAX_LENGTH


def test_an_unwritable_demo_model_path_is_a_config_error(tmp_path):
    from app import ensure_demo_model

    (tmp_path / "file").write_text("")
    s = load_settings({"DEMO_MODEL_PATH": str(tmp_path / "file" / "demo.bin")}, dotenv=None)
    with pytest.raises(ConfigError, match=r"^DEMO_MODEL_PATH: cannot write .*demo\.bin"):
        ensure_demo_model(s)

