"""What each Kubernetes overlay adds to the device-neutral base: a GPU each for the verifier, the drafter and
the trainer workers, on separate nodes (gpu); CPU devices and thread counts that match the CPU requests (cpu)."""

from __future__ import annotations

import json

from deploy_rendering import K8S, by_kind, labels_match, load_role, pod_workloads, render, role_env


def test_gpu_overlay():
    objects = render("gpu")
    deployments = by_kind(objects, "Deployment")
    for role, other in (("verifier", "drafter"), ("drafter", "verifier")):
        spec = deployments[role]["spec"]["template"]["spec"]
        assert str(spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) == "1", role
        required = spec["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        assert any(term["topologyKey"] == "kubernetes.io/hostname"
                   and labels_match(term["labelSelector"], deployments[other]["spec"]["template"]["metadata"]["labels"])
                   for term in required), f"{role} must avoid nodes running a {other}"
        assert deployments[role]["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0
    for role in ("verifier", "drafter", "trainer"):
        assert load_role(role, role_env(objects, role), {}, role).device.startswith("cuda"), role
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
        settings = load_role(role, role_env(objects, role), {}, role)
        assert settings.device == "cpu" and settings.threads > 0, role
    deployments = by_kind(objects, "Deployment")
    for role in ("verifier", "drafter"):
        container = deployments[role]["spec"]["template"]["spec"]["containers"][0]
        threads = load_role(role, role_env(objects, role), {}, role).threads
        assert str(container["resources"]["requests"]["cpu"]) == str(threads), \
            f"{role}: CPU request should match SPECD_THREADS"
        assert container["image"].endswith(":cpu")


def test_base_is_device_neutral():
    assert "nvidia.com/gpu" not in "".join(p.read_text() for p in (K8S / "base").glob("*.yaml"))
