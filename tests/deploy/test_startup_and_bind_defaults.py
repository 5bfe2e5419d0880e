"""Start-up: invalid settings from the environment, YAML or flags fail fast with a message that names them and
no traceback, and every service binds loopback unless told otherwise."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest
from production_stacks import ROOT
from production_stacks import stack  # noqa: F401 - fixtures

from specdec.config import SETTINGS_BY_ROLE, load_settings


def test_invalid_config_fails_fast_at_startup(tmp_path):
    typo = tmp_path / "typo.yaml"
    typo.write_text("coordinator:\n  verifier_addrs: ['127.0.0.1:1']\n  draft_lenght: 3\n")
    unknown_common = tmp_path / "common.yaml"
    unknown_common.write_text("bogus_setting: 1\ncoordinator:\n  verifier_addrs: ['127.0.0.1:1']\n")
    bad_clients = tmp_path / "clients"
    bad_clients.write_text("alice token-a\nbob\n")
    addr = ["--verifier-addrs", "127.0.0.1:1"]
    cases = {  # name: (argv, extra env, exit code, words the message must contain)
        "env bad int": (addr, {"SPECD_DRAFT_LENGTH": "banana"}, 2, ["invalid coordinator settings", "draft_length"]),
        "env bad enum": (addr, {"SPECD_MODE": "warp"}, 2, ["invalid coordinator settings", "mode"]),
        "yaml unknown key": (["--config", str(typo)], {}, 2, ["draft_lenght", "Extra inputs are not permitted"]),
        "yaml unknown common key": ([], {"SPECD_CONFIG": str(unknown_common)}, 2, ["bogus_setting"]),
        "flag out of range": (addr + ["--port", "70000"], {}, 2, ["port"]),
        "bad address": (["--verifier-addrs", "nocolon"], {}, 2, ["not host:port"]),
        "no verifier": ([], {}, 2, ["verifier_addrs needs at least one"]),
        "unreadable token file": (addr, {"SPECD_AUTH_TOKEN_FILE": str(tmp_path / "missing")}, 1, ["auth_token_file"]),
        "malformed clients file": (addr, {"SPECD_AUTH_CLIENTS_FILE": str(bad_clients)}, 1,
                                   ["auth_clients_file line 2", "client_id token"]),
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPECD_")}
    started = time.monotonic()
    processes = {
        name: subprocess.Popen([sys.executable, "-m", "specd.cli", "serve", "coordinator", *argv], cwd=ROOT,
                               env={**env, **extra}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name, (argv, extra, _, _) in cases.items()}
    try:
        for name, process in processes.items():
            _, stderr = process.communicate(timeout=60)
            _, _, code, words = cases[name]
            assert process.returncode == code, (name, stderr)
            for word in words:
                assert word in stderr, (name, stderr)
            assert "Traceback" not in stderr, (name, stderr)
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
    assert time.monotonic() - started < 45


def _non_loopback_address() -> str | None:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect(("10.255.255.255", 1))  # no packet is sent: this only picks the outgoing interface
            address = sock.getsockname()[0]
    except OSError:
        return None
    return None if address.startswith("127.") else address


def test_default_bind_address_is_loopback(stack):
    for role, schema in SETTINGS_BY_ROLE.items():
        # The roles that need an upstream address to start get one; the bind addresses are what is checked.
        overrides = {"coordinator": {"verifier_addrs": "127.0.0.1:1"}, "http": {"coordinator_addrs": "127.0.0.1:1"}}
        overrides = overrides.get(role, {})
        settings = load_settings(role, overrides, environ={})
        assert settings.host == "127.0.0.1" and settings.metrics_host == "127.0.0.1", role
        for name, field in schema.model_fields.items():
            if name.endswith("host"):
                assert field.default == "127.0.0.1", (role, name)
    # The running services (bound with the defaults) are not reachable on another interface.
    address = _non_loopback_address()
    if address is None:
        pytest.skip("no non-loopback interface to probe")
    for port in (stack.port("coordinator"), stack.port("verifier0"), stack.port("drafter"),
                 stack.metrics_ports["coordinator"]):
        with pytest.raises(OSError):
            socket.create_connection((address, port), timeout=1).close()
