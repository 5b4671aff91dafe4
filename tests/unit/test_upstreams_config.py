"""UPSTREAMS_FILE: one clear line per mistake, and model ids that cannot clash."""

from __future__ import annotations

import pytest

from app import check_config
from config.settings import ConfigError, load_settings

GOOD = '[upstreams.gpu-box]\nbase_url = "http://10.0.0.5:8000/v1"\nmodels = ["qwen"]\n'


def settings_for(tmp_path, text: str, **env: str):
    path = tmp_path / "upstreams.toml"
    path.write_text(text)
    return load_settings({"UPSTREAMS_FILE": str(path), **env}, dotenv=None)


@pytest.mark.parametrize("text, message", [
    ('[upstreams.x]\nbase_url = "ftp://h/v1"\n', "[upstreams.x]: base_url 'ftp://h/v1' is not an http:// or https://"),
    ('[upstreams.x]\nbase_url = "http://:8000/v1"\n', "is not an http:// or https:// URL"),
    ('[upstreams.x]\nbase_url = "http://u:pw@h/v1"\n', "base_url must not hold credentials"),
    ('[upstreams.x]\nbase_url = "http://h/v1"\nmodel = ["a"]\n', "[upstreams.x]: unknown field 'model'"),
    ('[upstreams.x]\nbase_url = "http://h"\n[upstreams.x]\nbase_url = "http://g"\n', "[upstreams.x] is declared twice"),
    ('[upstreams.x]\nbase_url = "http://h"\napi_key = "k"\napi_key_env = "K"\n',
     "give api_key or api_key_env, not both"),
    ('[upstreams.x]\nbase_url = "http://h"\napi_key_env = "NOT_SET_ANYWHERE"\n', "NOT_SET_ANYWHERE, which is not set"),
    ('[upstreams.x]\nbase_url = "http://h"\nweight = 0\n', "[upstreams.x]: weight must be a number > 0"),
    ('[upstreams.x]\nbase_url = "http://h"\nmodels = "a"\n', "models must be a list of model ids"),
    ('[upstreams.x]\nmodels = ["a"]\n', "[upstreams.x]: base_url is missing"),
    ('[upstream.x]\nbase_url = "http://h"\n', "unknown top-level key 'upstream'"),
    ('upstreams = 1\n', "has no [upstreams.<name>] tables"),
])
def test_each_mistake_is_one_line_naming_it(tmp_path, text, message):
    with pytest.raises(ConfigError) as error:
        settings_for(tmp_path, text)
    assert message in str(error.value) and "\n" not in str(error.value).split("write")[0]


def test_a_missing_file_and_the_key_from_the_environment(tmp_path):
    with pytest.raises(ConfigError, match="UPSTREAMS_FILE: cannot read"):
        load_settings({"UPSTREAMS_FILE": str(tmp_path / "nope.toml")}, dotenv=None)
    s = settings_for(tmp_path, GOOD.replace("models", 'api_key_env = "GPU_KEY"\nmodels'), GPU_KEY="sk-1")
    assert s.upstreams[0].api_key == "sk-1" and "sk-1" not in repr(s)
    assert not s.uses_demo_model  # upstreams are a backend: the demo model does not stand in


@pytest.mark.parametrize("env, message", [
    ({"MODEL_ALIASES": "qwen=chatglm3-6b"}, "model 'qwen' is also an alias in MODEL_ALIASES"),
    ({"CLOUDFLARE_ACCOUNT_ID": "a", "CLOUDFLARE_API_TOKEN": "t", "CLOUDFLARE_MODELS": "qwen"},
     "model 'qwen' is also a local or Workers AI model"),
])
def test_a_model_id_served_elsewhere_is_refused(tmp_path, env, message):
    with pytest.raises(ConfigError, match=message):
        check_config(settings_for(tmp_path, GOOD, **env))


def test_upstream_models_and_aliases_check_like_the_others(tmp_path):
    check_config(settings_for(tmp_path, GOOD, MODEL_ALIASES="gpt-4o=qwen", MODEL_FALLBACKS="gpt-4o=qwen",
                              MAX_TOKENS_CEILING="qwen=100"))
    with pytest.raises(ConfigError, match="MODEL_FALLBACKS: qwen=qwn: no configured model or alias is called 'qwn'"):
        check_config(settings_for(tmp_path, GOOD, MODEL_FALLBACKS="qwen=qwn"))
