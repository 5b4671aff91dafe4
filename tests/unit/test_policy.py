"""The policy the settings decide (config/policy.py), derived without a registry, a backend or a model file."""

from config.policy import LocalModel, Policy
from config.settings import load_settings


def derive(env: dict[str, str], *local: LocalModel) -> Policy:
    return Policy.derive(load_settings(env, dotenv=None), local)


def test_an_alias_has_its_models_ceiling_unless_it_has_its_own():
    policy = derive({"MAX_TOKENS_CEILING": "1024,m=256,c=100", "MODEL_ALIASES": "a=m,b=x,c=m"})
    assert policy.ceilings == {"m": 256, "c": 100, "a": 256}
    assert (policy.ceiling("a"), policy.ceiling("c"), policy.ceiling("b"),
            policy.ceiling("x")) == (256, 100, 1024, 1024)
    assert policy.limits.ceiling("a") == 256 and policy.limits.max_tokens == 1024


def test_without_a_ceiling_the_context_decides():
    assert derive({}).ceiling("anything") is None


def test_fallback_chains_keep_their_order():
    policy = derive({"MODEL_FALLBACKS": "a=b, a=c, b=c"})
    assert policy.fallbacks == {"a": ("b", "c"), "b": ("c",)}
    assert derive({}).fallbacks == {}


def test_only_a_local_model_that_reads_images_and_its_aliases_take_images():
    env = {"MODEL_ALIASES": "see=v,other=x"}
    assert derive(env, LocalModel("v", 2048, reads_images=True)).image_models == {"v", "see"}
    assert derive(env, LocalModel("v", 2048)).image_models == frozenset()
    assert derive(env).limits.image_models == frozenset()


def test_request_limits_come_from_the_settings():
    limits = derive({"MAX_MESSAGES": "3", "MAX_INPUT_CHARS": "99", "MAX_IMAGE_BYTES": "2048"}).limits
    assert (limits.max_messages, limits.max_input_chars, limits.max_image_bytes) == (3, 99, 2048)
