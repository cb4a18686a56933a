"""Several models (MODELS, MODELS_FILE), served names, chat templates, keys and the daily time."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from settings import DailyTime, SettingsError, build_settings


def test_one_model_is_served_under_its_directory_name_or_hub_id(tiny_causal: Path) -> None:
    [model] = build_settings({"MODEL_ID": str(tiny_causal)}).model_configs
    assert model.name == tiny_causal.name and model.accepts(str(tiny_causal)) and model.accepts(tiny_causal.name)
    [hub] = build_settings({"MODEL_ID": "facebook/opt-125m"}).model_configs
    assert hub.name == "facebook/opt-125m" and hub.deployment_name == "facebook--opt-125m"
    [named] = build_settings({"MODEL_ID": "facebook/opt-125m", "SERVED_MODEL_NAME": "opt"}).model_configs
    assert named.name == "opt" and named.accepts("facebook/opt-125m") and not named.accepts("other")


def test_models_pairs_take_the_environment_as_defaults(tiny_causal: Path) -> None:
    settings = build_settings({"MODELS": f"a={tiny_causal}, b=org/b", "MAX_REPLICAS": "3", "PRIORITY": "1"})
    a, b = settings.model_configs
    assert (a.name, a.model_id, b.name, b.model_id) == ("a", str(tiny_causal), "b", "org/b")
    assert a.max_replicas == b.max_replicas == 3 and a.priority == b.priority == 1
    assert settings.model("org/b") is b and settings.model("b") is b and settings.model("c") is None


def test_models_file_entries_override_the_defaults(tiny_causal: Path, tmp_path: Path) -> None:
    path = tmp_path / "models.yaml"
    path.write_text(
        f"""
models:
  - name: small
    model_id: {tiny_causal}
    priority: 2
    min_replicas: 1
    idle_timeout_s: 600
  - name: big
    model_id: org/big
    num_gpus_per_replica: 1
    max_new_tokens_limit: 64
    max_new_tokens: 32
    chat_template: "{{% for m in messages %}}{{{{ m.content }}}}{{% endfor %}}"
"""
    )
    small, big = build_settings({"MODELS_FILE": str(path), "MAX_REPLICAS": "4"}).model_configs
    assert (small.priority, small.min_replicas, small.idle_timeout_s, small.max_replicas) == (2, 1, 600, 4)
    assert big.num_gpus_per_replica == 1 and big.resolved_device == "cuda" and big.max_new_tokens_limit == 64
    assert big.max_new_tokens == 32
    assert big.chat_template is not None and "{%" in big.chat_template
    json_path = tmp_path / "models.json"
    json_path.write_text(json.dumps({"models": [{"name": "j", "model_id": str(tiny_causal)}]}))
    assert [m.name for m in build_settings({"MODELS_FILE": str(json_path)}).model_configs] == ["j"]


@pytest.mark.parametrize(
    ("content", "fragments"),
    [
        ("models:\n  - name: x\n    model_id: org/x\n    max_replicas: 0\n", ["'x'", "max_replicas", "greater than"]),
        ("models:\n  - name: x\n    model_id: org/x\n    max_replica: 2\n", ["'x'", "max_replica", "extra inputs"]),
        ("models:\n  - name: x\n", ["'x'", "model_id: field required"]),
        ("models:\n  - name: x\n    model_id: /no/such/dir\n", ["'x'", "no model checkpoint"]),
        ("models:\n  - model_id: org/x\n", ["'#0'", "name", "field required"]),
        ("models: []\n", ["non-empty `models:` list"]),
        ("nothing: here\n", ["`models:`"]),
        ("models: [\n", ["cannot read it"]),
        ("models:\n  - {name: x, model_id: org/x, min_replicas: 3, max_replicas: 1}\n", ["'x'", "MAX_REPLICAS (1)"]),
    ],
)
def test_a_bad_models_file_names_the_file_the_model_and_the_field(tmp_path: Path, content: str, fragments) -> None:
    path = tmp_path / "models.yaml"
    path.write_text(content)
    with pytest.raises(SettingsError) as info:
        build_settings({"MODELS_FILE": str(path)})
    message = str(info.value)
    assert "MODELS_FILE" in message and str(path) in message, message
    for fragment in fragments:
        assert fragment in message, message


def test_a_models_file_that_repeats_a_name_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "models.yaml"
    path.write_text("models:\n  - {name: x, model_id: org/x}\n  - {name: x, model_id: org/y}\n")
    with pytest.raises(SettingsError) as info:
        build_settings({"MODELS_FILE": str(path)})
    # Like every settings error, it names the variable (and the file) before the repeated name.
    expected = f"MODELS_FILE {str(path)!r}: model names must be unique; repeated: x"
    assert str(info.value).splitlines()[-1].strip() == expected, info.value


@pytest.mark.parametrize(
    "models", ["a=org/a,a=org/b", '[{"name": "a", "model_id": "org/a"}, {"name": "a", "model_id": "org/b"}]']
)
def test_a_models_list_that_repeats_a_name_names_the_variable(models: str) -> None:
    with pytest.raises(SettingsError) as info:
        build_settings({"MODELS": models})
    assert str(info.value).splitlines()[-1].strip() == "MODELS: model names must be unique; repeated: a", info.value


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"MODELS": "a"}, "expected name=model_id pairs"),
        ({"MODELS": "a=org/a", "MODEL_ID": "org/b"}, "not both"),
        ({"MODELS": "a=org/a", "SERVED_MODEL_NAME": "x"}, "each entry has its own name"),
        ({"MODELS": "a=org/a,a=org/b"}, "MODELS: model names must be unique; repeated: a"),
        ({"MODELS": "a/b=org/a,a--b=org/b"}, "MODELS: model names must be unique; repeated: a--b"),
        ({"MODELS": "bad name=org/a"}, "should match pattern"),
        ({"MODELS": ",,"}, "lists no model"),
    ],
)
def test_bad_models_lists(env: dict[str, str], fragment: str) -> None:
    with pytest.raises(SettingsError, match=None) as info:
        build_settings(env)
    assert fragment in str(info.value)


def test_both_models_and_models_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "m.yaml"
    path.write_text("models: [{name: a, model_id: org/a}]")
    with pytest.raises(SettingsError, match="MODELS or MODELS_FILE, not both"):
        build_settings({"MODELS": "a=org/a", "MODELS_FILE": str(path)})


def test_chat_template_from_a_file_travels_as_text(tmp_path: Path) -> None:
    path = tmp_path / "chat.jinja"
    path.write_text("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}")
    [model] = build_settings({"MODEL_ID": "org/a", "CHAT_TEMPLATE": str(path)}).model_configs
    assert model.chat_template == path.read_text()
    assert "characters" in model.public()["chat_template"]
    (tmp_path / "empty.jinja").write_text("no template here")
    with pytest.raises(SettingsError, match="holds no Jinja template"):
        build_settings({"CHAT_TEMPLATE": str(tmp_path / "empty.jinja")})


def test_api_keys_from_the_variable_and_the_file_never_show(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text("# comment\n\nkey-from-file-1\nkey-from-file-2\n")
    settings = build_settings({"API_KEY": "key-from-env-1, key-from-env-2", "API_KEYS_FILE": str(path)})
    values = [k.get_secret_value() for k in settings.api_keys]
    assert values == ["key-from-env-1", "key-from-env-2", "key-from-file-1", "key-from-file-2"]
    for shown in (repr(settings), str(settings.env_vars()), settings.model_dump_json()):
        assert "key-from-env-1" not in shown
    assert "API_KEY" not in settings.env_vars() and "ADMIN_API_KEY" not in settings.env_vars()
    empty = tmp_path / "none"
    empty.write_text("# only a comment\n")
    with pytest.raises(SettingsError, match="holds no key"):
        build_settings({"API_KEYS_FILE": str(empty)})


def test_scale_to_zero_at_is_a_daily_time_in_a_zone() -> None:
    settings = build_settings({"SCALE_TO_ZERO_AT": "21:00 America/Chicago"})
    at = settings.daily_scale_to_zero
    assert at == DailyTime.parse("21:00 America/Chicago")
    chicago = ZoneInfo("America/Chicago")
    assert at.next_after(datetime(2026, 7, 1, 20, 59, tzinfo=chicago)) == datetime(2026, 7, 1, 21, 0, tzinfo=chicago)
    assert at.next_after(datetime(2026, 7, 1, 21, 0, tzinfo=chicago)) == datetime(2026, 7, 2, 21, 0, tzinfo=chicago)
    for bad, fragment in (("25:00 UTC", "not a time of day"), ("21:00 Mars/Olympus", "unknown time zone")):
        with pytest.raises(SettingsError, match=fragment):
            build_settings({"SCALE_TO_ZERO_AT": bad})


def test_admin_api_key_is_stripped(tmp_path: Path) -> None:
    # A key mounted from a Secret file often ends with a newline; the header a client sends never does.
    settings = build_settings({"ADMIN_API_KEY": "  adm-secret-0123456789\n", "API_KEY": "sk-user-0123456789"})
    assert settings.admin_api_key is not None
    assert settings.admin_api_key.get_secret_value() == "adm-secret-0123456789"


@pytest.mark.parametrize("where", ["API_KEY", "API_KEYS_FILE"])
def test_admin_api_key_must_differ_from_every_user_key(tmp_path: Path, where: str) -> None:
    keys = tmp_path / "keys"
    keys.write_text("sk-file-0123456789\nshared-key-0123456789\n")
    env = {"API_KEY": "sk-env-0123456789", "API_KEYS_FILE": str(keys)}
    env[where] = "shared-key-0123456789" if where == "API_KEY" else env[where]
    with pytest.raises(SettingsError) as info:
        build_settings({**env, "ADMIN_API_KEY": " shared-key-0123456789 "})
    message = str(info.value)
    assert "ADMIN_API_KEY must differ from every API key" in message and "shared-key" not in message


def test_keys_reach_only_the_gateway(tiny_causal: Path) -> None:
    """Of the graph's deployments, only the Gateway (which checks the keys) is given them in its arguments."""
    from ray import cloudpickle
    from ray.serve import Application

    from ray_serve_app import build_graph

    keys = {"API_KEY": "sk-user-0123456789", "ADMIN_API_KEY": "adm-secret-0123456789"}
    given: dict[str, set[str]] = {}

    def walk(app: Application) -> None:
        deployment = app._bound_deployment
        arguments = [*deployment.init_args, *deployment.init_kwargs.values()]
        blob = cloudpickle.dumps([a for a in arguments if not isinstance(a, Application)])
        given[deployment.name] = {name for name, key in keys.items() if key.encode() in blob}
        for nested in arguments:
            if isinstance(nested, Application):
                walk(nested)

    walk(build_graph(build_settings({"MODEL_ID": str(tiny_causal), **keys})))
    assert given == {"Gateway": {"API_KEY", "ADMIN_API_KEY"}, "PoolController": set()}


def test_a_stored_configuration_is_read_back_without_touching_the_disk(tmp_path: Path, tiny_causal: Path) -> None:
    from pydantic import ValidationError

    from settings import ModelConfig

    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    written = ModelConfig.model_validate({"name": "m", "model_id": str(tiny_causal), "chat_template": str(template)})
    stored = written.model_dump(mode="json")
    # On a node without the checkpoint (weights mounted only on GPU workers): read back as it was written.
    elsewhere = stored | {"model_id": "/mnt/weights/only-on-workers"}
    assert ModelConfig.from_stored(elsewhere).model_id == "/mnt/weights/only-on-workers"
    assert ModelConfig.from_stored(stored) == written
    with pytest.raises(ValidationError, match="max_replicas"):  # its shape is still checked
        ModelConfig.from_stored(stored | {"max_replicas": "many"})
    with pytest.raises(ValidationError, match="renamed_field"):  # a record from another version
        ModelConfig.from_stored(stored | {"renamed_field": 1})
