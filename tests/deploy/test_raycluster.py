"""The KubeRay RayCluster that runs the trainer: its structure, pod templates valid as PodTemplates, the Ray
image, one `specd train` driver in the head and plain Ray workers with one CPU each."""

from __future__ import annotations

import re

import pytest
from deploy_rendering import (
    OVERLAYS,
    by_kind,
    container_command,
    k8s_validate,
    parse_specd_command,
    raycluster_templates,
    render,
    specd_role,
)


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
        k8s_validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "x"}, "template": template},
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
