"""NetworkPolicy reachability: every edge the table needs is allowed, every forbidden one denied.

The table (k8s/base/network/reachability.yaml) names pods by their label sets; each must be
the labels of a pod the tree really renders, so the table cannot drift from the manifests.
An edge is open when the source's egress AND the destination's ingress allow it; a side no
policy selects is open in that direction (Kubernetes' default), as the default-deny policy
is what closes it.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from delivery.cluster_fit.findings import Finding
from delivery.cluster_fit.tree import NAMESPACE, REACHABILITY_FILE, PodTemplate, Tree

CHECK = "network"


def _matches(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    """A LabelSelector against labels ({} selects everything; None selects nothing)."""
    if selector is None:
        return False
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def _ns_labels(namespace: str) -> dict[str, str]:
    return {"kubernetes.io/metadata.name": namespace}


def _port_ok(ports: list[dict[str, Any]] | None, port: int, named: dict[str, int]) -> bool:
    if not ports:
        return True
    for p in ports:
        want = p.get("port")
        if want is None:
            return True
        if isinstance(want, str):
            want = named.get(want)
        end = p.get("endPort", want)
        if want is not None and int(want) <= port <= int(end if end is not None else want):
            return True
    return False


def _peer_ok(peers: list[dict[str, Any]] | None, other: dict[str, Any], own_namespace: str) -> bool:
    """Whether one rule's from/to list admits the other end of the edge."""
    if not peers:
        return True
    for peer in peers:
        if "ipBlock" in peer:
            if "ip" not in other:
                continue
            block = peer["ipBlock"]
            addr = ipaddress.ip_address(other["ip"])
            if addr in ipaddress.ip_network(block["cidr"]) and not any(
                addr in ipaddress.ip_network(e) for e in block.get("except", [])
            ):
                return True
            continue
        if "ip" in other:
            continue
        ns_sel = peer.get("namespaceSelector")
        if ns_sel is None:
            ns_ok = other["namespace"] == own_namespace
        else:
            ns_ok = _matches(ns_sel, _ns_labels(other["namespace"]))
        pod_sel = peer.get("podSelector", {})
        if ns_ok and _matches(pod_sel, other.get("labels", {})):
            return True
    return False


def _policy_types(spec: dict[str, Any]) -> list[str]:
    """Kubernetes' default: Ingress always, Egress when the policy has egress rules."""
    return list(spec.get("policyTypes") or ["Ingress", *(["Egress"] if spec.get("egress") else [])])


def _direction_ok(
    policies: list[dict[str, Any]],
    end: dict[str, Any],
    other: dict[str, Any],
    port: int,
    kind: str,
    named: dict[str, int],
) -> bool:
    """``kind`` is Egress (end = source) or Ingress (end = destination)."""
    if "ip" in end or end["namespace"] != NAMESPACE:
        return True  # outside the namespace this tree governs
    selecting = [
        p
        for p in policies
        if _matches(p.get("spec", {}).get("podSelector", {}), end["labels"])
        and kind in _policy_types(p.get("spec", {}))
    ]
    if not selecting:
        return True
    key, peers_key = ("egress", "to") if kind == "Egress" else ("ingress", "from")
    return any(
        _peer_ok(rule.get(peers_key), other, NAMESPACE) and _port_ok(rule.get("ports"), port, named)
        for p in selecting
        for rule in p.get("spec", {}).get(key) or []
    )


def _named_ports(pods: list[PodTemplate], labels: dict[str, str]) -> dict[str, int]:
    named = {}
    for pod in pods:
        if all(pod.labels.get(k) == v for k, v in labels.items()):
            for c in pod.containers():
                for p in c.get("ports", []):
                    if "name" in p:
                        named[p["name"]] = int(p["containerPort"])
    return named


def allowed(tree: Tree, edge: dict[str, Any]) -> bool:
    policies = [o.doc for o in tree.of_kind("NetworkPolicy") if o.namespace == NAMESPACE]
    src, dst, port = edge["from"], edge["to"], int(edge["port"])
    named = _named_ports(tree.pods, dst.get("labels", {})) if "labels" in dst else {}
    return _direction_ok(policies, src, dst, port, "Egress", named) and _direction_ok(
        policies, dst, src, port, "Ingress", named
    )


def _is_real_pod(tree: Tree, end: dict[str, Any]) -> bool:
    if "ip" in end or end.get("namespace", NAMESPACE) != NAMESPACE:
        return True
    return any(all(p.labels.get(k) == v for k, v in end["labels"].items()) for p in tree.pods)


def check(tree: Tree) -> list[Finding]:
    table = tree.reachability
    if not table.get("must_allow"):
        return [Finding(CHECK, REACHABILITY_FILE, "no table of who must reach whom")]
    out = []
    for verdict, edges in (
        ("must_allow", table.get("must_allow") or []),
        ("must_deny", table.get("must_deny") or []),
    ):
        for edge in edges:
            for end in ("from", "to"):
                edge[end].setdefault("namespace", NAMESPACE) if "ip" not in edge[end] else None
                if not _is_real_pod(tree, edge[end]):
                    out.append(
                        Finding(
                            CHECK,
                            edge["name"],
                            f"no rendered pod carries the {end} labels {edge[end]['labels']}",
                        )
                    )
            open_ = allowed(tree, edge)
            if verdict == "must_allow" and not open_:
                out.append(
                    Finding(CHECK, edge["name"], f"blocked by the NetworkPolicies (port {edge['port']})")
                )
            if verdict == "must_deny" and open_:
                out.append(Finding(CHECK, edge["name"], f"allowed, but must be denied (port {edge['port']})"))
    return out
