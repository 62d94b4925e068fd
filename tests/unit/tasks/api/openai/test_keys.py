"""API keys: hashed comparison, allowed models, requests per minute and concurrent requests."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from gpufleet.tasks.api.openai.errors import OpenAIError
from gpufleet.tasks.api.openai.keys import ANONYMOUS, KeyRing, read_keys_file
from gpufleet.tasks.errors import SettingsError
from gpufleet.tasks.settings import load_settings

SECRET = "team-a-secret-0123456789"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def ring(*keys: dict[str, Any], token: str | None = None, clock: Clock | None = None) -> KeyRing:
    settings = load_settings(api={"keys": list(keys), "token": token})
    loaded = KeyRing.from_settings(settings)
    if clock is not None:
        loaded.clock = clock
    return loaded


def status_of(call: object) -> int:
    assert isinstance(call, OpenAIError)
    return call.status


def test_no_keys_means_open() -> None:
    assert ring().authenticate(None) is ANONYMOUS


def test_a_key_given_as_its_digest_or_in_the_clear_authenticates() -> None:
    digest = hashlib.sha256(SECRET.encode()).hexdigest()
    for spec in ({"name": "a", "key_sha256": digest}, {"name": "a", "key": SECRET}):
        keys = ring(spec)
        assert keys.authenticate(f"Bearer {SECRET}").name == "a"
        with pytest.raises(OpenAIError, match="matches none") as wrong:
            keys.authenticate("Bearer not-the-key")
        assert wrong.value.status == 401
        with pytest.raises(OpenAIError, match="needs an API key") as missing:
            keys.authenticate(None)
        assert missing.value.status == 401 and missing.value.headers["WWW-Authenticate"] == "Bearer"


def test_the_api_token_is_a_key_without_limits() -> None:
    keys = ring({"name": "a", "key": SECRET, "requests_per_minute": 1}, token="the-api-token")
    caller = keys.authenticate("Bearer the-api-token")
    assert caller.name == "token" and caller.requests_per_minute is None


def test_models_outside_the_allowed_list_are_forbidden() -> None:
    keys = ring({"name": "a", "key": SECRET, "models": ["org/x"]})
    caller = keys.authenticate(f"Bearer {SECRET}")
    keys.authorize(caller, "org/x")
    with pytest.raises(OpenAIError, match="may not use model 'org/y'; it may use: org/x") as refused:
        keys.authorize(caller, "org/y")
    assert refused.value.status == 403


def test_requests_per_minute_is_a_sliding_window() -> None:
    clock = Clock()
    keys = ring({"name": "a", "key": SECRET, "requests_per_minute": 2}, clock=clock)
    caller = keys.authenticate(f"Bearer {SECRET}")
    for _ in range(2):
        with keys.admit(caller):
            clock.now += 10
    with pytest.raises(OpenAIError, match="2 requests a minute") as limited, keys.admit(caller):
        pass
    assert limited.value.status == 429
    assert limited.value.headers["Retry-After"] == "40"  # the first request leaves the window 60 s after it came
    clock.now += 40
    with keys.admit(caller):
        pass


def test_concurrent_requests_are_bounded_and_released() -> None:
    keys = ring({"name": "a", "key": SECRET, "max_concurrent": 1})
    caller = keys.authenticate(f"Bearer {SECRET}")
    with keys.admit(caller):
        with pytest.raises(OpenAIError, match="already has 1 requests running") as busy, keys.admit(caller):
            pass
        assert busy.value.status == 429
    with pytest.raises(RuntimeError), keys.admit(caller):
        raise RuntimeError("the request failed")
    assert caller.in_flight == 0


def test_a_key_needs_exactly_one_secret_and_unique_names() -> None:
    with pytest.raises(SettingsError, match="exactly one of key_sha256"):
        load_settings(api={"keys": [{"name": "a"}]})
    with pytest.raises(SettingsError, match="shorter than 16"):
        load_settings(api={"keys": [{"name": "a", "key": "short"}]})
    with pytest.raises(SettingsError, match="unique"):
        ring({"name": "a", "key": SECRET}, {"name": "a", "key": SECRET + "x"})


def test_keys_come_from_the_environment_as_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUFLEET_API__KEYS", json.dumps([{"name": "env", "key": SECRET, "models": ["org/x"]}]))
    settings = load_settings()
    assert settings.api.keys[0].name == "env" and settings.api.keys[0].models == ("org/x",)


def test_a_keys_file_adds_keys_and_says_what_is_wrong(tmp_path: Path) -> None:
    good = tmp_path / "keys.json"
    good.write_text(json.dumps([{"name": "file", "key": SECRET}]))
    keys = KeyRing.from_settings(load_settings(api={"keys_file": good}))
    assert keys.authenticate(f"Bearer {SECRET}").name == "file"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"name": "file"}]))
    with pytest.raises(SettingsError, match="must be a JSON list of keys"):
        read_keys_file(bad)
    with pytest.raises(SettingsError, match="cannot read"):
        read_keys_file(tmp_path / "missing.json")
