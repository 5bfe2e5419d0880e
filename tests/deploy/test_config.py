"""The settings schema: sources and their precedence, the one flag builder, runtime settings."""

from __future__ import annotations

import re
import typing
from pathlib import Path

import pytest

from specd.cli import build_parser
from specdec import redisutil
from specdec.config import (
    MODE_NAMES,
    POLICY_NAMES,
    SETTINGS_BY_ROLE,
    ConfigError,
    CoordinatorSettings,
    load_settings,
    runtime_settings,
    settings_from_args,
    settings_reference,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def clean_env(monkeypatch):
    """No SPECD_* variable of the calling shell leaks into a test."""
    import os

    for key in [k for k in os.environ if k.startswith("SPECD_")]:
        monkeypatch.delenv(key)
    return monkeypatch


def test_flags_beat_env_beat_yaml_beat_defaults_nested_groups_too(clean_env, tmp_path):
    config = tmp_path / "specd.yaml"
    config.write_text("log_level: warning\n"
                      "trainer:\n  lr: 0.1\n  batch_size: 4\n  publish_every: 7\n"
                      "  eagle: {epochs: 5, lr: 0.01, window: 300}\n")
    clean_env.setenv("SPECD_CONFIG", str(config))
    clean_env.setenv("SPECD_BATCH_SIZE", "16")
    clean_env.setenv("SPECD_EAGLE__LR", "0.02")
    args = build_parser().parse_args(["train", "--lr", "0.5", "--eagle-epochs", "3", "--tuning-grad-clip", "0.25",
                                      "--no-log-json"])
    settings = settings_from_args("trainer", args)
    assert settings.lr == 0.5 and settings.eagle.epochs == 3.0  # flags
    assert settings.batch_size == 16 and settings.eagle.lr == 0.02  # environment
    assert settings.publish_every == 7 and settings.eagle.window == 300 and settings.log_level == "warning"  # YAML
    assert settings.eagle.round_traces == 200 and settings.tuning.block_ms == 500  # defaults
    assert settings.tuning.grad_clip == 0.25 and settings.log_json is False


def test_serve_and_the_trainer_commands_take_every_setting_as_a_flag(clean_env):
    parser = build_parser()
    serve = parser.parse_args(["serve", "coordinator", "--verifier-addrs", "a:1,b:2", "--policy", "goodput"])
    coordinator = settings_from_args("coordinator", serve)
    assert coordinator.verifier_addrs == ["a:1", "b:2"] and coordinator.policy == "goodput"
    with pytest.raises(SystemExit):  # choices come from the schema's Literal
        parser.parse_args(["serve", "coordinator", "--policy", "fastest"])
    for command in ("train", "distill", "refine-eagle"):
        extra = ["--prompts", "p.jsonl"] if command == "distill" else []
        args = parser.parse_args([command, *extra, "--eagle-base", "mine", "--tuning-keep-rejected", "2",
                                  "--consumer-group", "g"])
        settings = settings_from_args("trainer", args)
        assert (settings.eagle.base, settings.tuning.keep_rejected, settings.consumer_group) == ("mine", 2, "g")


def test_environment_lists_nested_fields_and_errors_name_the_field(clean_env):
    settings = load_settings("coordinator", {}, environ={"SPECD_VERIFIER_ADDRS": "v:1, v:2", "SPECD_MODE": "sequential"})
    assert settings.verifier_addrs == ["v:1", "v:2"] and settings.mode == "sequential"
    trainer = load_settings("trainer", {}, environ={"SPECD_TUNING__MAX_CONTEXT": "64", "SPECD_EAGLE__BASE": "x"})
    assert trainer.tuning.max_context == 64 and trainer.eagle.base == "x"
    with pytest.raises(ConfigError, match=r"eagle\.epochs"):
        load_settings("trainer", {}, environ={"SPECD_EAGLE__EPOCHS": "-1"})
    with pytest.raises(ConfigError, match="config file"):
        load_settings("verifier", {}, environ={"SPECD_CONFIG": "/nonexistent/specd.yaml"})


def test_runtime_settings_are_read_from_the_environment_through_the_schema(clean_env, tmp_path):
    clean_env.setenv("SPECD_STATE_DIR", str(tmp_path / "state"))
    clean_env.setenv("SPECD_BACKEND_WAIT_S", "7.5")
    clean_env.setenv("SPECD_SMALL_GEMM_LIB", "/opt/lib.so")
    clean_env.setenv("SPECD_CACHE_DIR", str(tmp_path / "cache"))
    clean_env.setenv("CC", "clang")
    runtime = runtime_settings()
    assert (runtime.backend_wait_s, runtime.small_gemm_lib, runtime.compiler) == (7.5, "/opt/lib.so", "clang")
    assert runtime.cache_dir == tmp_path / "cache"
    assert redisutil.embedded_db_path() == (tmp_path / "state" / "redis.db").resolve()
    clean_env.setenv("SPECD_BACKEND_WAIT_S", "-1")
    with pytest.raises(ConfigError, match="backend_wait_s"):
        runtime_settings()


ENV_READ = re.compile(r"os\.environ\.get\(|os\.getenv\(|os\.environ\[[^\]]+\](?!\s*=)")


def test_only_the_settings_schema_reads_the_environment():
    packages = ["specdec", "coordinator", "verifier_svc", "drafter_svc", "trainer"]
    readers = [f"{path.relative_to(REPO)}:{number}" for package in packages for path in (REPO / package).rglob("*.py")
               for number, line in enumerate(path.read_text().splitlines(), 1) if ENV_READ.search(line)]
    assert not readers, readers


def test_policy_and_mode_names_are_declared_once():
    from specdec.v1 import generation_pb2
    from specdec.wire.client import MODES, POLICIES

    assert typing.get_args(CoordinatorSettings.model_fields["policy"].annotation) == POLICY_NAMES
    assert typing.get_args(CoordinatorSettings.model_fields["mode"].annotation) == MODE_NAMES
    assert tuple(POLICIES) == POLICY_NAMES and tuple(MODES) == MODE_NAMES
    enum = {name: number for name, number in generation_pb2.DraftPolicy.items() if number}
    assert {f"DRAFT_POLICY_{name.upper()}": number for name, number in POLICIES.items()} == enum


def test_the_reference_lists_nested_and_runtime_settings():
    reference = settings_reference()
    assert "| `eagle.epochs` | `SPECD_EAGLE__EPOCHS` |" in reference
    assert "| `backend_wait_s` | `SPECD_BACKEND_WAIT_S` |" in reference and "| `compiler` | `CC` |" in reference
    assert all(f"### {role}" in reference for role in SETTINGS_BY_ROLE)
