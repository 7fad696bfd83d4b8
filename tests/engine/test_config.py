"""One engine settings type: EngineConfig holds the defaults, SchedulerConfig is built from it
unchanged, and a value beyond a limit is refused with the field, the value and the limit."""

from __future__ import annotations

import dataclasses

import pytest

from engine.loader import EngineConfig
from engine.scheduler import SchedulerConfig
from tests.conftest import run_cli


def test_the_scheduler_gets_exactly_what_the_user_asked_for():
    config = EngineConfig(n_slots=8, token_budget=8, max_waiting=3, retry_after_s=2.0)
    # the KV pool: n_slots × max_len / 4 by default, what the user gives otherwise
    assert config.scheduler(max_len=64, compact_slots=False) == SchedulerConfig(
        n_slots=8,
        max_len=64,
        token_budget=8,
        max_waiting=3,
        retry_after_s=2.0,
        compact_slots=False,
        kv_tokens=128,
    )
    assert dataclasses.replace(config, kv_tokens=300).scheduler(max_len=64).kv_tokens == 300
    # never below one request of the longest
    assert EngineConfig(n_slots=2).scheduler(max_len=64).kv_tokens == 64


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"n_slots": 64, "token_budget": 32}, r"EngineConfig.token_budget = 32 must be >= 64"),
        ({"n_slots": 0}, r"EngineConfig.n_slots = 0 must be >= 1"),
        ({"max_waiting": 0}, r"EngineConfig.max_waiting = 0 must be >= 1"),
        ({"retry_after_s": 0.0}, r"EngineConfig.retry_after_s = 0.0 must be > 0"),
        ({"threads": 0}, r"EngineConfig.threads = 0 must be >= 1"),
        (
            {"max_len": 64, "kv_tokens": 32},
            r"EngineConfig.kv_tokens = 32 must be >= 64 \(max_len: one request of the longest\)",
        ),
        (
            {"n_slots": 2, "max_len": 64, "kv_tokens": 129},
            r"EngineConfig.kv_tokens = 129 must be <= n_slots × max_len = 128",
        ),
    ],
)
def test_a_value_beyond_its_limit_is_refused_not_raised(settings, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig(**settings)


def test_a_built_config_cannot_change():
    with pytest.raises(dataclasses.FrozenInstanceError):
        EngineConfig().token_budget = 1  # type: ignore[misc]


def test_the_cli_refuses_a_bad_budget_in_one_line(tiny_package):
    r = run_cli("engine", "serve", str(tiny_package), "--slots", "64", "--token-budget", "32")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "token_budget = 32 must be >= 64" in r.stderr


def test_the_cli_refuses_a_pool_smaller_than_one_request_in_one_line(tiny_package):
    # the tiny package's max_len (128) is known only once it is opened
    r = run_cli("engine", "serve", str(tiny_package), "--kv-tokens", "100")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "EngineConfig.kv_tokens = 100 must be >= 128" in r.stderr
