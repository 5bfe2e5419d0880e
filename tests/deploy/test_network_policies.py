"""The NetworkPolicies, evaluated with Kubernetes' ingress semantics: which pods (and namespaces) reach each
service port, and nothing else."""

from __future__ import annotations

import pytest
from deploy_rendering import HTTP_PORT, METRICS_PORT, OVERLAYS, by_kind, labels_match, pod_workloads, render


def _allowed(policies, namespaces: dict, src: tuple[str, dict], dst: tuple[str, dict], port: int) -> bool:
    """NetworkPolicy ingress semantics for TCP `port` from src to dst pod."""
    src_ns, src_labels = src
    dst_ns, dst_labels = dst
    selecting = [p for p in policies if p["metadata"]["namespace"] == dst_ns
                 and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
                 and labels_match(p["spec"]["podSelector"], dst_labels)]
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
                ns_ok = (labels_match(ns_sel, namespaces.get(src_ns, {})) if ns_sel is not None
                         else src_ns == dst_ns)
                pod_ok = labels_match(pod_sel, src_labels) if pod_sel is not None else True
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
