"""The Docker Compose files, rendered by `docker-compose config` (GPU file, and with the CPU override): the
compose-spec schema, every role with its health check, command, settings, ports, secrets and hardening,
the checkpoint volume, devices, Redis persistence, the Ray image, and the monitoring profile's wiring."""

from __future__ import annotations

import functools
import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from deploy_rendering import (
    DASHBOARD,
    DEPLOY,
    GRPC_PORTS,
    HTTP_PORT,
    METRICS_PORT,
    PYPROJECT,
    by_kind,
    check_env_names,
    check_health_argv,
    check_redis_persistence,
    compose_model,
    container_argv,
    load_role,
    parse_cli,
    parse_duration_s,
    parse_specd_command,
    pin,
    redis_options,
    render,
    secret_sources,
    specd_role,
    specd_services,
)

from specdec.config import SETTINGS_BY_ROLE


@functools.lru_cache(maxsize=1)
def compose_schema_validator():
    import importlib.resources as resources

    import jsonschema

    # check-jsonschema vendors the upstream compose-spec schema (its
    # `check-compose-spec` hook); no other offline source of it exists on PyPI.
    pytest.importorskip("check_jsonschema", reason="check-jsonschema (vendors compose-spec.json) not installed")
    schema_file = resources.files("check_jsonschema") / "builtin_schemas" / "vendor" / "compose-spec.json"
    schema = json.loads(schema_file.read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


@dataclass(frozen=True)
class SpecdService:
    """A specd service of the rendered compose model, with the settings it starts with."""

    name: str
    role: str
    svc: dict
    where: str
    prelude: str  # the shell before `exec specd ...`
    env: dict
    settings: object


@functools.lru_cache(maxsize=None)
def specd_compose_services(variant: str) -> tuple[SpecdService, ...]:
    """Each specd service's command parsed by the CLI, its environment (and the variables its shell prelude
    exports: the Redis URL built from the secret) checked against its role's settings, and those loaded."""
    model = compose_model(variant)
    services = model["services"]
    out = []
    for name, (role, svc) in specd_services(model).items():
        where = f"compose {variant} {name}"
        argv, prelude = parse_specd_command(container_argv(svc), where)
        cmd_role, overrides = specd_role(argv, where)
        assert cmd_role == role, f"{where}: runs the {cmd_role} command but is labelled {role}"
        env = svc.get("environment") or {}
        check_env_names(role, env, where)

        # Variables the shell prelude exports (the Redis URL built from the secret).
        exported = dict(re.findall(r'export\s+(SPECD_[A-Z_]+)="?([^";]*)"?', prelude))
        check_env_names(role, exported, where)
        if "SPECD_REDIS_URL" in exported:
            url = exported["SPECD_REDIS_URL"]
            m = re.fullmatch(r"redis://:\$\(cat /run/secrets/(\w+)\)@([\w.-]+):(\d+)/\d+", url)
            assert m, f"{where}: unexpected redis URL {url!r}"
            secret, host, port = m.groups()
            assert secret in secret_sources(svc), f"{where}: reads secret {secret} it does not mount"
            assert host in services and port == "6379", f"{where}: redis URL points at {host}:{port}"
            exported["SPECD_REDIS_URL"] = f"redis://:pw@{host}:{port}/0"
        settings = load_role(role, {**env, **exported}, overrides, where)
        out.append(SpecdService(name, role, svc, where, prelude, env, settings))
    return tuple(out)


def roles_of(variant: str) -> dict[str, str]:
    """role -> compose service name."""
    return {service.role: service.name for service in specd_compose_services(variant)}


@pytest.mark.parametrize("variant", ["gpu", "cpu"])
def test_compose_matches_compose_spec_schema(variant):
    validator = compose_schema_validator()
    errors = sorted(validator.iter_errors(compose_model(variant)), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


@pytest.mark.parametrize("variant", ["gpu", "cpu"])
def test_compose_runs_every_role_and_starts_each_service_once_its_dependencies_are_healthy(variant):
    model = compose_model(variant)
    services = model["services"]
    roles = {role: name for name, (role, _) in specd_services(model).items()}
    assert set(roles) == set(SETTINGS_BY_ROLE), f"compose must run every role once: {roles}"
    for required in ("redis", "ray-head", "prometheus", "grafana"):
        assert required in services

    for name, svc in services.items():
        hc = svc.get("healthcheck")
        assert hc and hc.get("test") and not hc.get("disable"), f"{name}: needs a healthcheck"
        for dep, spec in (svc.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown service {dep}"
            assert spec["condition"] == "service_healthy", f"{name} -> {dep}: depends_on must wait for health"


@pytest.mark.parametrize("variant", ["gpu", "cpu"])
def test_compose_specd_services_start_with_settings_that_load_and_bind_every_interface(variant):
    for service in specd_compose_services(variant):
        svc, env, settings, where = service.svc, service.env, service.settings, service.where
        # A crash (a signal) or a dead model thread (exit 1) is restarted; `docker compose stop` stays stopped.
        assert svc.get("restart") == "unless-stopped", f"{where}: restart: unless-stopped"
        assert env.get("SPECD_HOST") == "0.0.0.0", f"{where}: containers must bind SPECD_HOST=0.0.0.0"
        assert env.get("SPECD_METRICS_HOST") == "0.0.0.0", f"{where}: SPECD_METRICS_HOST=0.0.0.0"
        assert env.get("SPECD_METRICS_PORT") == str(METRICS_PORT), where
        if settings.auth_token_file:
            assert settings.auth_token_file == "/run/secrets/specd_auth_token", where
            assert "specd_auth_token" in secret_sources(svc), f"{where}: mount the specd_auth_token secret"
        assert (Path(svc["build"]["context"]) / svc["build"]["dockerfile"]).is_file(), f"{where}: {svc['build']}"


@pytest.mark.parametrize("variant", ["gpu", "cpu"])
def test_compose_publishes_only_service_ports_on_loopback(variant):
    for service in specd_compose_services(variant):
        svc, settings, where = service.svc, service.settings, service.where
        for port in svc.get("ports") or []:
            assert port["host_ip"] == "127.0.0.1", f"{where}: publish on loopback only by default, got {port}"
            assert port["target"] in (settings.port, settings.metrics_port), f"{where}: publishes unknown port {port}"


@pytest.mark.parametrize("variant", ["gpu", "cpu"])
def test_compose_grpc_services_probe_their_port_drain_and_run_hardened(variant):
    for service in specd_compose_services(variant):
        if service.role not in GRPC_PORTS:
            continue
        role, svc, settings, where = service.role, service.svc, service.settings, service.where
        assert settings.port == GRPC_PORTS[role], f"{where}: SPECD_PORT {settings.port} != {GRPC_PORTS[role]}"
        check_health_argv(svc["healthcheck"]["test"][1:], settings.port, where)
        assert parse_duration_s(svc.get("stop_grace_period", "10s")) > settings.grace_period_s, \
            f"{where}: stop_grace_period must exceed SPECD_GRACE_PERIOD_S so streams can drain"
        assert svc.get("user") and not str(svc["user"]).startswith("0"), f"{where}: run as non-root"
        assert svc.get("read_only") is True, f"{where}: read-only root filesystem"


@pytest.mark.parametrize("variant", ["gpu", "cpu"])
def test_compose_trainer_joins_the_ray_cluster(variant):
    [service] = [s for s in specd_compose_services(variant) if s.role == "trainer"]
    svc, prelude, settings, where = service.svc, service.prelude, service.settings, service.where
    assert settings.ray_address == "auto", f"{where}: the trainer driver must join the Ray cluster"
    assert "ray start --address=ray-head:6379" in prelude, f"{where}: must join the ray-head node first"
    assert "ray-head" in (svc.get("depends_on") or {}), where


@pytest.mark.parametrize("variant", ["gpu", "cpu"])
def test_compose_http_tier_serves_its_port_and_reaches_the_coordinators(variant):
    specd = specd_services(compose_model(variant))
    [service] = [s for s in specd_compose_services(variant) if s.role == "http"]
    svc, settings, where = service.svc, service.settings, service.where
    assert settings.port == HTTP_PORT, f"{where}: SPECD_PORT {settings.port} != {HTTP_PORT}"
    probe = parse_cli(svc["healthcheck"]["test"][1:], where)
    assert probe.command == "health" and probe.addr == f"http://127.0.0.1:{HTTP_PORT}", \
        f"{where}: healthcheck must run `specd health --addr http://127.0.0.1:{HTTP_PORT}`"
    assert any(p["target"] == HTTP_PORT and p["published"] == str(HTTP_PORT) for p in svc["ports"]), \
        f"{where}: the HTTP API must be published on its own port"
    assert parse_duration_s(svc.get("stop_grace_period", "10s")) > settings.grace_period_s, where
    assert settings.coordinator_addrs, f"{where}: no coordinator addresses"
    for addr in settings.coordinator_addrs:
        host, _, port = addr.rpartition(":")
        assert specd.get(host, (None,))[0] == "coordinator", f"{where}: {addr} is not a coordinator service"
        assert int(port) == GRPC_PORTS["coordinator"], f"{where}: {addr} vs port {GRPC_PORTS['coordinator']}"
        assert host in (svc.get("depends_on") or {}), f"{where}: must wait for {host}"


@pytest.mark.parametrize("variant", ["gpu", "cpu"])
def test_compose_coordinator_is_published_and_reaches_the_verifiers_and_drafters(variant):
    specd = specd_services(compose_model(variant))
    [service] = [s for s in specd_compose_services(variant) if s.role == "coordinator"]
    svc, settings, where = service.svc, service.settings, service.where
    assert any(p["target"] == settings.port and p["published"] == str(settings.port) for p in svc["ports"]), \
        f"{where}: coordinator gRPC must be published on its own port"
    for addrs, backend in ((settings.verifier_addrs, "verifier"), (settings.drafter_addrs, "drafter")):
        assert addrs, f"{where}: no {backend} addresses"
        for addr in addrs:
            host, _, port = addr.rpartition(":")
            assert specd.get(host, (None,))[0] == backend, f"{where}: {addr} is not a {backend} service"
            assert int(port) == GRPC_PORTS[backend], f"{where}: {addr} vs port {GRPC_PORTS[backend]}"
            assert host in (svc.get("depends_on") or {}), f"{where}: must wait for {host}"


@pytest.mark.parametrize("variant", ["gpu", "cpu"])
def test_compose_secrets_are_declared_mounted_and_kept_out_of_git(variant):
    model = compose_model(variant)
    services = model["services"]
    # Secrets: declared, used, example present, real file kept out of git.
    declared = model.get("secrets") or {}
    assert {"specd_auth_token", "redis_password"} <= set(declared)
    for name, svc in services.items():
        for secret in secret_sources(svc):
            assert secret in declared, f"{name} uses undeclared secret {secret}"
    ignore = (DEPLOY / "secrets" / ".gitignore").read_text().split()
    assert "*" in ignore and "!*.example" in ignore, "deploy/secrets/.gitignore must ignore real secrets"
    for secret, spec in declared.items():
        path = Path(spec["file"])
        assert path.parent == DEPLOY / "secrets", f"secret {secret}: {spec['file']}"
        assert path.with_name(path.name + ".example").is_file(), f"secret {secret}: add {path.name}.example"


@pytest.mark.parametrize("variant", ["gpu", "cpu"])
def test_compose_checkpoint_store_is_one_volume_the_trainer_writes_and_the_drafter_reads(variant):
    model = compose_model(variant)
    services = model["services"]
    roles = roles_of(variant)
    # The checkpoint store is one named volume: the trainer writes, the drafter reads.
    mounts = {}
    for name in (roles["trainer"], roles["drafter"]):
        [mounts[name]] = [v for v in services[name].get("volumes") or [] if v["target"] == "/checkpoints"]
        assert services[name]["environment"]["SPECD_CHECKPOINT_DIR"] == "/checkpoints"
    trainer, drafter = mounts[roles["trainer"]], mounts[roles["drafter"]]
    assert trainer["type"] == drafter["type"] == "volume" and trainer["source"] == drafter["source"] in model["volumes"]
    assert not trainer.get("read_only"), "the trainer writes checkpoints"
    assert drafter.get("read_only") is True, "the drafter only reads checkpoints"


def reserved_devices(variant: str, name: str) -> list[dict]:
    service = compose_model(variant)["services"][name]
    return service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices") or []


def test_compose_gives_the_verifier_and_the_drafter_a_gpu_each():
    services = compose_model("gpu")["services"]
    roles = roles_of("gpu")
    ids = {}
    for role in ("verifier", "drafter"):
        [dev] = reserved_devices("gpu", roles[role])
        assert dev["driver"] == "nvidia" and "gpu" in dev["capabilities"], dev
        ids[role] = set(dev["device_ids"])
        assert services[roles[role]]["environment"]["SPECD_DEVICE"].startswith("cuda")
    assert ids["verifier"] and ids["drafter"] and not ids["verifier"] & ids["drafter"], \
        f"verifier and drafter must get different GPUs: {ids}"


def test_compose_cpu_override_reserves_no_gpu_and_sets_cpu_threads():
    model = compose_model("cpu")
    for name in model["services"]:
        assert not reserved_devices("cpu", name), f"cpu override: {name} still reserves a GPU"
    for name, (role, svc) in specd_services(model).items():
        env = svc["environment"]
        assert env.get("SPECD_DEVICE") == "cpu", f"cpu override: {name} SPECD_DEVICE={env.get('SPECD_DEVICE')}"
        assert int(env.get("SPECD_THREADS", "0")) > 0, f"cpu override: {name} needs SPECD_THREADS"
        assert svc["build"]["dockerfile"].endswith("Dockerfile.cpu"), name
        assert svc["image"].endswith(":cpu"), name


@pytest.mark.parametrize("variant", ["gpu", "cpu"])
def test_compose_redis_keeps_its_data(variant):
    model = compose_model(variant)
    redis = model["services"]["redis"]
    tokens = shlex.split(container_argv(redis)[-1])
    options = redis_options(tokens[tokens.index("redis-server") + 1:])
    check_redis_persistence(options, "compose redis")
    [volume] = [v for v in redis["volumes"] if v["target"] == options["dir"]]
    assert volume["type"] == "volume" and volume["source"] in model["volumes"], \
        f"compose redis: {options['dir']} must be a named volume, got {volume}"
    assert options["requirepass"] == "$(cat /run/secrets/redis_password)", "compose redis: password from the secret"
    assert "redis_password" in secret_sources(redis)


def test_compose_ray_image_matches_raycluster():
    services = compose_model("gpu")["services"]
    versions = {services[n]["build"]["args"]["RAY_VERSION"] for n in ("ray-head", "trainer")}
    raycluster = by_kind(render("gpu"), "RayCluster")["specd-trainer"]
    ray_pin = pin(PYPROJECT["optional-dependencies"]["train"], "ray")
    assert versions == {raycluster["spec"]["rayVersion"]} == {ray_pin}, \
        "compose, KubeRay and pyproject's train extra must name one Ray version"
    head = services["ray-head"]
    assert head["command"][:3] == ["ray", "start", "--head"]
    assert head["healthcheck"]["test"][1:3] == ["ray", "health-check"]


# --------------------------------------------------------------------------
# Grafana and Prometheus wiring (the dashboard itself: tests/deploy/test_observability.py)
# --------------------------------------------------------------------------

def test_grafana_provisioning_points_at_the_dashboard():
    model = compose_model("gpu")
    mounts = {Path(v["source"]): v["target"] for v in model["services"]["grafana"]["volumes"] if v["type"] == "bind"}
    dashboard_dir = mounts[DASHBOARD].rsplit("/", 1)[0]
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/specd.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == dashboard_dir
    scrape = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    targets = {t for job in scrape["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    assert targets == {f"{name}:{METRICS_PORT}" for name in specd_services(model)}
