"""The Kubernetes overlays, rendered by kustomize: every object there once and valid against the API schemas,
environment names that are settings fields and load, ports, probes, Services and graceful drain, the HTTP
tier, Redis persistence, the checkpoint claim, the autoscalers and the disruption budgets."""

from __future__ import annotations

import re

import pytest
from deploy_rendering import (
    COMPONENT_ROLE,
    GRPC_PORTS,
    HTTP_PORT,
    METRICS_PORT,
    OVERLAYS,
    SECRET_PLACEHOLDER,
    by_kind,
    check_env_names,
    check_redis_persistence,
    container_command,
    effective_env,
    k8s_validate,
    labels_match,
    load_role,
    parse_specd_command,
    pod_workloads,
    redis_options,
    render,
    specd_role,
)

from coordinator.server import SERVICE_NAME as COORDINATOR_SERVICE
from specdec.config import SETTINGS_BY_ROLE


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


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_objects_validate_against_kubernetes_schemas(overlay):
    for obj in render(overlay):
        if obj["kind"] == "RayCluster":
            continue  # a CRD: structure checked in test_raycluster, its pod templates there too
        k8s_validate(obj, f"{overlay}: {obj['kind']}/{obj['metadata']['name']}")


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


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_ports_probes_services_and_drain(overlay):
    objects = render(overlay)
    services = by_kind(objects, "Service")
    deployments = by_kind(objects, "Deployment")
    for role, port in GRPC_PORTS.items():
        dep = deployments[role]
        template = dep["spec"]["template"]
        assert labels_match(dep["spec"]["selector"], template["metadata"]["labels"])
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
        assert labels_match({"matchLabels": svc["spec"]["selector"]}, template["metadata"]["labels"])
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
    assert labels_match({"matchLabels": service["spec"]["selector"]}, template["metadata"]["labels"])
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
                   if labels_match(pdb["spec"]["selector"], d["spec"]["template"]["metadata"]["labels"])]
        assert len(matched) == 1, f"PDB {pdb['metadata']['name']} selects {matched}"
    assert {"verifier", "drafter", "coordinator"} <= set(by_kind(objects, "PodDisruptionBudget"))
