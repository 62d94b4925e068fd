from __future__ import annotations

import pytest

from gpufleet.tasks.errors import SettingsError
from gpufleet.tasks.settings import get_settings, load_settings


def test_defaults_are_valid() -> None:
    settings = load_settings()
    assert settings.gpu.memory_fraction == 0.90
    assert settings.broker.visibility_timeout_s > settings.jobs.longest_hard_limit_s
    assert settings.trust_remote_code is False


def test_nested_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUFLEET_GPU__MEMORY_FRACTION", "0.5")
    monkeypatch.setenv("GPUFLEET_GPU__WARMUP__OPERATIONS", '["matmul"]')
    monkeypatch.setenv("GPUFLEET_GPU__MEMORY_POOL__COMMON_SIZES_MB", "[128, 512]")
    monkeypatch.setenv("GPUFLEET_PRIORITY_MODELS", "org/a, org/b")
    monkeypatch.setenv("GPUFLEET_FLEET__GPU_TYPES", '["H100","L4"]')
    monkeypatch.setenv("GPUFLEET_MODEL_ROOT", "/models")
    settings = get_settings()
    assert settings.gpu.memory_fraction == 0.5
    assert [op.value for op in settings.gpu.warmup.operations] == ["matmul"]
    assert settings.gpu.memory_pool.common_sizes_mb == (128, 512)
    assert settings.priority_models == ("org/a", "org/b")
    assert settings.fleet.gpu_types == ("H100", "L4")
    assert str(settings.model_root) == "/models"


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("GPUFLEET_GPU__MEMORY_FRACTION", "1.5"),
        ("GPUFLEET_GPU__PRECISION", "fp8"),
        ("GPUFLEET_GPU__WARMUP__SIZE", "huge"),
        ("GPUFLEET_GPU__MEMORY_POOL__COMMON_SIZES_MB", "[0]"),
        ("GPUFLEET_BROKER_URL", "localhost"),
        ("GPUFLEET_JOBS__TIME_LIMIT_S", "-1"),
    ],
)
def test_invalid_values_name_the_variable(monkeypatch: pytest.MonkeyPatch, variable: str, value: str) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError, match=variable):
        load_settings()


def test_visibility_timeout_must_cover_the_longest_hard_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUFLEET_BROKER__VISIBILITY_TIMEOUT_S", "600")
    with pytest.raises(SettingsError, match="GPUFLEET_BROKER__VISIBILITY_TIMEOUT_S"):
        load_settings()


def test_soft_limit_below_hard(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUFLEET_JOBS__SOFT_TIME_LIMIT_S", "400")
    with pytest.raises(SettingsError, match="GPUFLEET_JOBS__SOFT_TIME_LIMIT_S"):
        load_settings()


def test_every_list_setting_takes_comma_separated_values(monkeypatch: pytest.MonkeyPatch) -> None:
    # Nested sections included: pydantic-settings alone JSON-decodes those and fails on a,b.
    monkeypatch.setenv("GPUFLEET_GPU__WARMUP__OPERATIONS", "matmul, memory")
    monkeypatch.setenv("GPUFLEET_GPU__MEMORY_POOL__COMMON_SIZES_MB", "128,512")
    monkeypatch.setenv("GPUFLEET_PRIORITY_MODELS", '["org/a"]')
    monkeypatch.setenv("GPUFLEET_FLEET__GPU_TYPES", "h100,l4")
    settings = load_settings()
    assert [op.value for op in settings.gpu.warmup.operations] == ["matmul", "memory"]
    assert settings.gpu.memory_pool.common_sizes_mb == (128, 512)
    assert settings.priority_models == ("org/a",)
    assert settings.fleet.gpu_types == ("h100", "l4")


def test_an_empty_list_setting_is_an_empty_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUFLEET_GPU__WARMUP__OPERATIONS", "")
    monkeypatch.setenv("GPUFLEET_FLEET__GPU_TYPES", " ")
    settings = load_settings()
    assert settings.gpu.warmup.operations == ()
    assert settings.fleet.gpu_types == ()


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("GPUFLEET_GPU__WARMUP__OPERATIONS", "[matmul", "not a JSON list"),
        ("GPUFLEET_GPU__WARMUP__OPERATIONS", "matmul,bogus", "'matmul', 'conv2d' or 'memory'"),
        ("GPUFLEET_PRIORITY_MODELS", '["org/a", ', "not a JSON list"),
        ("GPUFLEET_GPU__MEMORY_POOL__COMMON_SIZES_MB", "64,big", "integer"),
    ],
)
def test_bad_list_values_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, message: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError, match=variable) as raised:
        load_settings()
    assert message in str(raised.value)


def test_a_bad_json_section_is_a_settings_error_not_a_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUFLEET_GPU", '{"warmup": ')
    with pytest.raises(SettingsError, match='field "gpu"'):
        load_settings()


@pytest.mark.parametrize(
    ("environment", "variables"),
    [
        (
            {"GPUFLEET_FLEET__HEARTBEAT_TTL_S": "3"},
            ("GPUFLEET_FLEET__HEARTBEAT_TTL_S (3 s)", "GPUFLEET_FLEET__HEARTBEAT_INTERVAL_S (2 s)"),
        ),
        (
            {"GPUFLEET_JOBS__SOFT_TIME_LIMIT_S": "400"},
            ("GPUFLEET_JOBS__SOFT_TIME_LIMIT_S (400 s)", "GPUFLEET_JOBS__TIME_LIMIT_S (330 s)"),
        ),
        (
            {"GPUFLEET_JOBS__LOAD_SOFT_TIME_LIMIT_S": "990"},
            ("GPUFLEET_JOBS__LOAD_SOFT_TIME_LIMIT_S (990 s)", "GPUFLEET_JOBS__LOAD_TIME_LIMIT_S (960 s)"),
        ),
        (
            {"GPUFLEET_BROKER__VISIBILITY_TIMEOUT_S": "600"},
            ("GPUFLEET_BROKER__VISIBILITY_TIMEOUT_S (600 s)", "GPUFLEET_JOBS__LOAD_TIME_LIMIT_S (960 s)"),
        ),
        ({"GPUFLEET_FAULTS": "oom:infer:m:1"}, ("Unset GPUFLEET_FAULTS", "GPUFLEET_DIAGNOSTICS=true")),
    ],
)
def test_a_rule_between_settings_names_the_variables_to_change(
    monkeypatch: pytest.MonkeyPatch, environment: dict[str, str], variables: tuple[str, ...]
) -> None:
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as raised:
        load_settings()
    message = str(raised.value)
    for variable in variables:
        assert variable in message
    # Not the section pydantic locates the rule at (GPUFLEET_FLEET: ...), nor a placeholder for the whole settings.
    assert "GPUFLEET_*" not in message and "Value error" not in message
    assert not any(f"{section}:" in message for section in ("GPUFLEET_FLEET", "GPUFLEET_JOBS", "GPUFLEET_BROKER"))
