"""Settings: defaults, bounds, cross-field rules, and messages that name the variable."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from ray.serve.config import AutoscalingConfig

from settings import REPO_ROOT, Settings, SettingsError, build_settings

BAD_VALUES = [
    ("MAX_NEW_TOKENS", "abc", "valid integer"),
    ("MAX_NEW_TOKENS", "0", "greater than or equal to 1"),
    ("MAX_NEW_TOKENS_LIMIT", "-5", "greater than or equal to 1"),
    ("TEMPERATURE", "3", "less than or equal to 2"),
    ("TEMPERATURE", "nan", "finite number"),
    ("TEMPERATURE", "hot", "valid number"),
    ("TOP_P", "0", "greater than 0"),
    ("TOP_P", "1.5", "less than or equal to 1"),
    ("TOP_K", "-1", "greater than or equal to 0"),
    ("TOP_K", "2147483648", "less than or equal to 2147483647"),
    ("REPETITION_PENALTY", "0", "greater than 0"),
    ("NUM_GPUS_PER_REPLICA", "-1", "greater than or equal to 0"),
    ("NUM_CPUS_PER_REPLICA", "0", "greater than 0"),
    ("GPU_MEMORY_UTILIZATION", "0", "greater than 0"),
    ("GPU_MEMORY_UTILIZATION", "1.5", "less than or equal to 1"),
    ("CPU_OFFLOAD_GB", "-1", "greater than or equal to 0"),
    ("MIN_REPLICAS", "-1", "greater than or equal to 0"),
    ("MAX_REPLICAS", "0", "greater than or equal to 1"),
    ("MAX_REPLICAS", "two", "valid integer"),
    ("TARGET_ONGOING_REQUESTS", "0", "greater than 0"),
    ("IDLE_TIMEOUT_S", "-1", "greater than or equal to 0"),
    ("IDLE_TIMEOUT_S", "inf", "finite number"),
    ("RAY_SERVE_AUTOSCALER_IDLE_TIMEOUT_S", "soon", "valid number"),
    ("UPSCALE_DELAY_S", "-1", "greater than or equal to 0"),
    ("DOWNSCALE_DELAY_S", "x", "valid number"),
    ("AUTOSCALING_LOOK_BACK_S", "0", "greater than 0"),
    ("METRICS_PUSH_INTERVAL_S", "0", "greater than 0"),
    ("GRACEFUL_SHUTDOWN_TIMEOUT_S", "-2", "greater than or equal to 0"),
    ("WARM_WORKERS", "-1", "greater than or equal to 0"),
    ("WARM_WORKERS", "9", "less than or equal to 8"),
    ("WARM_WORKERS", "one", "valid integer"),
    ("MAX_BATCH_SIZE", "0", "greater than or equal to 1"),
    ("MAX_BATCH_TOKENS", "1", "greater than or equal to 2"),
    ("ENGINE_STALL_TIMEOUT_S", "0", "greater than 0"),
    ("MAX_BATCH_TOKENS", "lots", "valid integer"),
    ("MAX_OUTPUT_TOKENS_PER_REQUEST", "0", "greater than or equal to 1"),
    ("BATCH_WAIT_TIMEOUT_S", "2", "less than or equal to 1"),
    ("STEP_PROMPT_TOKENS", "0", "greater than or equal to 1"),
    ("STEP_PROMPT_TOKENS", "many", "valid integer"),
    ("STREAM_INTERVAL_S", "-0.1", "greater than or equal to 0"),
    ("STREAM_INTERVAL_S", "2", "less than or equal to 1"),
    ("STREAM_MESSAGES_PER_S", "-1", "greater than or equal to 0"),
    ("STREAM_MESSAGES_PER_S", "many", "valid number"),
    ("KERNEL_CACHE_CAPACITY", "0", "greater than or equal to 1"),
    ("KERNEL_CACHE_CAPACITY", "4096", "less than or equal to 1024"),
    ("PACKED_CACHE_DIR", "cache/packed", "must be an absolute path"),
    ("PACKED_CACHE_GB", "-1", "greater than or equal to 0"),
    ("HUGE_PAGES", "maybe", "valid boolean"),
    ("MAX_ONGOING_REQUESTS", "0", "greater than or equal to 1"),
    ("MAX_QUEUED_REQUESTS", "-2", "greater than or equal to -1"),
    ("RETRY_AFTER_S", "0", "greater than or equal to 1"),
    ("MAX_PROMPTS_PER_REQUEST", "0", "greater than or equal to 1"),
    ("MAX_PROMPT_CHARS", "many", "valid integer"),
    ("MAX_PROMPT_TOKENS", "", "valid integer"),
    ("REQUEST_TIMEOUT_S", "0", "greater than 0"),
    ("MODEL_LOAD_TIMEOUT_S", "-1", "greater than 0"),
    ("MODEL_ID", "", "at least 1 character"),
    ("MODEL_ID", "/no/such/model", "no model checkpoint"),
    ("DEVICE", "tpu", "'auto', 'cpu' or 'cuda'"),
    ("DTYPE", "int8", "'auto', 'float32', 'float16' or 'bfloat16'"),
    ("TOOL_PARSER", "mistral", "'hermes' or 'json'"),
    ("TASK", "classify", "'generate' or 'embed'"),
    ("TRUST_REMOTE_CODE", "maybe", "valid boolean"),
    ("HOST", "", "at least 1 character"),
    ("PORT", "70000", "less than or equal to 65535"),
    ("LOG_LEVEL", "LOUD", "'DEBUG', 'INFO', 'WARNING' or 'ERROR'"),
    ("CHAT_TEMPLATE", "no-such-template.jinja", "neither a Jinja template"),
    ("PRIORITY", "-1", "greater than or equal to 0"),
    ("SERVED_MODEL_NAME", "has space", "should match pattern"),
    ("MODELS", "", "at least 1 character"),
    ("MODELS_FILE", "/no/such/models.yaml", "no such file"),
    ("MAX_BODY_BYTES", "10", "greater than or equal to 1024"),
    ("STREAM_HEARTBEAT_S", "0", "greater than 0"),
    ("API_KEY", " , ", "holds no key"),
    ("API_KEY", "short", "at least 8 characters"),
    ("API_KEYS_FILE", "/no/such/keys", "no such file"),
    ("ADMIN_API_KEY", " ", "ADMIN_API_KEY: empty; unset it"),
    ("ADMIN_API_KEY", "a", "ADMIN_API_KEY: must be at least 8 characters"),
    ("ADMIN_API_KEY", "adm key with spaces", "ADMIN_API_KEY: must be at least 8 characters without spaces"),
    ("ADMIN_ALLOW_REMOTE_CODE", "perhaps", "valid boolean"),
    ("ADMIN_MODELS", " , ", "holds no pattern"),
    ("DOCS_NEED_KEY", "sometimes", "valid boolean"),
    ("AUTH_FAILURE_DELAY_S", "11", "less than or equal to 10"),
    ("AUTH_FAILURE_DELAY_S", "soon", "valid number"),
    ("AUTH_FAILURE_MAX_HELD", "-1", "greater than or equal to 0"),
    ("WARM_WORKER_ORPHAN_S", "5", "greater than or equal to 10"),
    ("GATEWAY_NODE_LABEL", "gateway", "expected 'key=value'"),
    ("GATEWAY_NODE_LABEL", "bad key!=x", "invalid label key name"),
    ("GATEWAY_NODE_LABEL", "role=not ok", "invalid label key value"),
    ("KEEP_HOT_PRIORITY", "-3", "greater than or equal to 0"),
    ("EVICTION_GRACE_S", "soon", "valid number"),
    ("SCALE_TO_ZERO_AT", "9pm", "expected 'HH:MM Area/City'"),
]
SECRET = {"API_KEY", "ADMIN_API_KEY"}


def test_defaults_are_valid(tiny_causal: Path) -> None:
    settings = build_settings({"MODEL_ID": str(tiny_causal)})
    assert settings.min_replicas == 0 and settings.max_replicas == 2
    assert settings.max_new_tokens == 256 and settings.temperature == 0.7 and settings.top_p == 0.9
    assert settings.resolved_device == "cpu"


def test_default_model_is_the_embedded_checkpoint() -> None:
    assert Path(Settings.model_fields["model_id"].default) == REPO_ROOT / "models" / "pydoc-gpt-mini"


@pytest.mark.parametrize(("name", "value", "expected"), BAD_VALUES)
def test_bad_value_names_its_variable(name: str, value: str, expected: str) -> None:
    with pytest.raises(SettingsError) as info:
        build_settings({name: value})
    message = str(info.value)
    shown_name = "IDLE_TIMEOUT_S" if name == "RAY_SERVE_AUTOSCALER_IDLE_TIMEOUT_S" else name
    assert f"{shown_name}: " in message or (name in SECRET and name in message)
    assert expected in message
    if name in SECRET:
        assert repr(value) not in message or not value.strip(), "a key's value must never be shown"
    else:
        assert repr(value) in message or name in ("MODEL_ID", "CHAT_TEMPLATE", "MODELS_FILE", "API_KEYS_FILE")


def test_every_field_has_a_bad_value_test() -> None:
    tested = {name for name, _, _ in BAD_VALUES}
    assert {name.upper() for name in Settings.model_fields} <= tested


def test_every_field_is_documented() -> None:
    for name, field in Settings.model_fields.items():
        assert field.description, f"{name} has no description"


def test_max_below_min_replicas_names_both() -> None:
    with pytest.raises(SettingsError, match=r"MAX_REPLICAS \(1\) must be at least MIN_REPLICAS \(3\)"):
        build_settings({"MIN_REPLICAS": "3", "MAX_REPLICAS": "1"})


def test_several_errors_are_reported_together() -> None:
    with pytest.raises(SettingsError) as info:
        build_settings({"MAX_NEW_TOKENS": "abc", "TOP_P": "7"})
    assert "MAX_NEW_TOKENS:" in str(info.value) and "TOP_P:" in str(info.value)


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"MAX_NEW_TOKENS": "2000"}, "MAX_NEW_TOKENS (2000) must not exceed MAX_NEW_TOKENS_LIMIT (1024)"),
        ({"DEVICE": "cuda"}, "DEVICE=cuda needs NUM_GPUS_PER_REPLICA > 0"),
        ({"DEVICE": "cpu", "NUM_GPUS_PER_REPLICA": "1"}, "DEVICE=cpu with NUM_GPUS_PER_REPLICA=1"),
        ({"MAX_QUEUED_REQUESTS": "0"}, "MAX_QUEUED_REQUESTS must be -1"),
        ({"NUM_GPUS_PER_REPLICA": "2.5"}, "NUM_GPUS_PER_REPLICA (2.5) must be a whole number above 1"),
        ({"CPU_OFFLOAD_GB": "4"}, "CPU_OFFLOAD_GB (4) applies to GPU replicas only"),
        (
            {"MAX_PROMPT_TOKENS": "512", "MAX_BATCH_TOKENS": "512"},
            "MAX_PROMPT_TOKENS (512) must be below MAX_BATCH_TOKENS",
        ),
        ({"MAX_BATCH_TOKENS": "200"}, "MAX_NEW_TOKENS (256) must be below MAX_BATCH_TOKENS (200)"),
        ({"MAX_OUTPUT_TOKENS_PER_REQUEST": "1000"}, "MAX_OUTPUT_TOKENS_PER_REQUEST (1000) is below model"),
        ({"AUTOSCALING_LOOK_BACK_S": "1", "METRICS_PUSH_INTERVAL_S": "2"}, "AUTOSCALING_LOOK_BACK_S (1)"),
    ],
)
def test_cross_field_rules(env: dict[str, str], fragment: str) -> None:
    with pytest.raises(SettingsError) as info:
        build_settings(env)
    assert fragment in str(info.value)


def test_idle_timeout_alias() -> None:
    assert build_settings({"RAY_SERVE_AUTOSCALER_IDLE_TIMEOUT_S": "42"}).idle_timeout_s == 42
    assert build_settings({"IDLE_TIMEOUT_S": "7", "RAY_SERVE_AUTOSCALER_IDLE_TIMEOUT_S": "7"}).idle_timeout_s == 7
    with pytest.raises(SettingsError, match="disagree"):
        build_settings({"IDLE_TIMEOUT_S": "7", "RAY_SERVE_AUTOSCALER_IDLE_TIMEOUT_S": "8"})


def test_names_are_case_insensitive() -> None:
    assert build_settings({"max_new_tokens": "12"}).max_new_tokens == 12


def test_env_vars_round_trip(tiny_causal: Path) -> None:
    settings = build_settings({"MODEL_ID": str(tiny_causal), "MAX_REPLICAS": "5", "PORT": "9000"})
    assert build_settings(settings.env_vars()) == settings


def test_autoscaling_config_uses_only_keys_ray_reads() -> None:
    settings = build_settings({"MIN_REPLICAS": "1", "MAX_REPLICAS": "3", "IDLE_TIMEOUT_S": "40"})
    config = settings.model_configs[0].autoscaling_config()
    assert set(config) <= set(AutoscalingConfig.model_fields)
    parsed = AutoscalingConfig(**config)
    for key, value in config.items():
        assert getattr(parsed, key) == value
    assert parsed.downscale_to_zero_delay_s == 40 - settings.autoscaling_look_back_s - settings.metrics_push_interval_s


def test_torch_threads_follow_cpus() -> None:
    assert build_settings({"NUM_CPUS_PER_REPLICA": "2.5"}).torch_threads == 2
    assert build_settings({"NUM_CPUS_PER_REPLICA": "0.5"}).torch_threads == 1


def test_bad_setting_stops_the_graph_import_with_exit_code() -> None:
    result = subprocess.run(
        [sys.executable, "-c", "import ray_serve_app; ray_serve_app.deployment_graph"],
        cwd=REPO_ROOT,
        env={"PATH": "/usr/bin:/bin", "MAX_NEW_TOKENS": "abc"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "MAX_NEW_TOKENS: input should be a valid integer" in result.stderr
    assert "'abc'" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_message_that_opens_with_a_variable_keeps_its_name() -> None:
    with pytest.raises(SettingsError) as info:
        build_settings({"MAX_NEW_TOKENS": "300", "MAX_NEW_TOKENS_LIMIT": "200"})
    assert "MAX_NEW_TOKENS (300) must not exceed MAX_NEW_TOKENS_LIMIT" in str(info.value)
