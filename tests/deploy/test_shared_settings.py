"""One source of the settings both deployments share: deploy/k8s/base/env/*.env, read by Docker Compose
(env_file) and by kustomize (configMapGenerator). Rendered by the real tools, every specd service starts with
exactly those files' values, in compose (GPU and CPU) and in Kubernetes (both overlays), and a value changed
in a file changes in both renderings: no other file restates it."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from deploy_rendering import (
    COMPONENT_ROLE,
    COMPOSE_FILES,
    K8S,
    OVERLAYS,
    ROOT,
    check_env_names,
    compose_config,
    compose_model,
    effective_env,
    kustomize_build,
    pod_workloads,
    render,
    specd_services,
)

from specdec.config import SETTINGS_BY_ROLE

SHARED_ENV = K8S / "base" / "env"
COMMON = "common"
KEY = re.compile(r"SPECD_[A-Z0-9_]+")


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=value lines as both compose and kustomize read them alike: nothing quoted, no ${...} (compose
    would interpolate it, kustomize not), no comment after a value (compose drops it, kustomize keeps it)."""
    values: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        where = f"{path.parent.name}/{path.name}:{number}"
        if not line.strip() or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep and KEY.fullmatch(key), f"{where}: not SPECD_NAME=value: {line!r}"
        assert value == value.strip() and value, f"{where}: an empty value or one with spaces around it"
        assert not re.search(r"[\"'$`\\]|\s#", value), f"{where}: quotes, $, backslashes or a comment in {value!r}"
        assert key not in values, f"{where}: {key} twice"
        values[key] = value
    return values


def shared_files(env_dir: Path = SHARED_ENV) -> dict[str, dict[str, str]]:
    """file stem (common, or a role) -> its values."""
    return {path.stem: read_env_file(path) for path in sorted(env_dir.glob("*.env"))}


def expected_env(files: dict[str, dict[str, str]], role: str) -> dict[str, str]:
    return {**files[COMMON], **files[role]}


def compose_envs(model: dict) -> dict[str, tuple[str, dict]]:
    """compose service -> (its role, the environment it starts with)."""
    return {name: (role, svc.get("environment") or {}) for name, (role, svc) in specd_services(model).items()}


def kubernetes_envs(objects) -> dict[str, tuple[str, dict]]:
    """pod template -> (the role its specd container runs, that container's environment)."""
    out = {}
    for where, component, template in pod_workloads(objects):
        role = COMPONENT_ROLE.get(component)
        if role is not None:  # Redis is no specd role
            out[where] = (role, effective_env(objects, template["spec"]["containers"][0], where))
    return out


def assert_reads(files: dict[str, dict[str, str]], envs: dict[str, tuple[str, dict]], deployment: str) -> None:
    assert {role for role, _ in envs.values()} == set(SETTINGS_BY_ROLE), f"{deployment}: not every role runs"
    for where, (role, env) in envs.items():
        wanted = expected_env(files, role)
        got = {key: env.get(key) for key in wanted}
        assert got == wanted, f"{deployment} {where}: {({k: v for k, v in got.items() if v != wanted[k]})}"


def test_every_role_has_an_env_file_whose_keys_are_its_settings():
    files = shared_files()
    assert set(files) == {COMMON, *SETTINGS_BY_ROLE}, sorted(files)
    for role in SETTINGS_BY_ROLE:
        check_env_names(role, files[COMMON], f"{SHARED_ENV.name}/{COMMON}.env (read by {role})")
        check_env_names(role, files[role], f"{SHARED_ENV.name}/{role}.env")
        both = set(files[COMMON]) & set(files[role])
        assert not both, f"{role}.env repeats {sorted(both)} of {COMMON}.env: keep each value in one file"
    # The policy has one default, in code (specdec/config.py).
    assert not any("SPECD_POLICY" in values for values in files.values())


@pytest.mark.parametrize("variant", ["gpu", "cpu"])
def test_compose_services_run_with_exactly_the_shared_values(variant):
    assert_reads(shared_files(), compose_envs(compose_model(variant)), f"compose {variant}")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kubernetes_pods_run_with_exactly_the_shared_values(overlay):
    assert_reads(shared_files(), kubernetes_envs(render(overlay)), f"kubernetes {overlay}")


def test_a_value_changed_in_an_env_file_changes_in_both_deployments(tmp_path):
    """Every value replaced by a marker in a copy of the deployment files: both renderings of the copy carry
    the markers, so neither reads the value from anywhere else."""
    for name in {path.name for paths in COMPOSE_FILES.values() for path in paths}:
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "deploy", tmp_path / "deploy")
    env_dir = tmp_path / SHARED_ENV.relative_to(ROOT)
    for path in env_dir.glob("*.env"):
        path.write_text("".join(f"{key}=marker-{path.stem}-{key.lower()}\n" for key in read_env_file(path)))
    files = shared_files(env_dir)
    assert files == {stem: {key: f"marker-{stem}-{key.lower()}" for key in values}
                     for stem, values in shared_files().items()}
    for variant, paths in COMPOSE_FILES.items():
        model = compose_config(tmp_path, [tmp_path / path.name for path in paths], variant)
        assert_reads(files, compose_envs(model), f"compose {variant} (markers)")
    for overlay in OVERLAYS:
        objects = kustomize_build(tmp_path / K8S.relative_to(ROOT) / "overlays" / overlay)
        assert_reads(files, kubernetes_envs(objects), f"kubernetes {overlay} (markers)")
