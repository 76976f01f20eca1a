"""Each ServiceAccount may do what its steps do (workflows/permissions.yaml), via the Roles bound to it."""

from __future__ import annotations

from typing import Any

from delivery.cluster_fit.findings import Finding
from delivery.cluster_fit.tree import NAMESPACE, PERMISSIONS_FILE, Tree

CHECK = "rbac"


def _rules_of(tree: Tree, account: str) -> list[dict[str, Any]]:
    roles = {(o.kind, o.name): o.doc.get("rules", []) for o in tree.of_kind("Role", "ClusterRole")}
    rules: list[dict[str, Any]] = []
    for binding in tree.of_kind("RoleBinding", "ClusterRoleBinding"):
        subjects = binding.doc.get("subjects", [])
        if any(
            s.get("kind") == "ServiceAccount"
            and s.get("name") == account
            and (s.get("namespace") or binding.namespace) == NAMESPACE
            for s in subjects
        ):
            ref = binding.doc.get("roleRef", {})
            rules.extend(roles.get((ref.get("kind", "Role"), ref.get("name", "")), []))
    return rules


def _covers(rule: dict[str, Any], group: str, resource: str, verb: str) -> bool:
    def has(values: list[str], wanted: str) -> bool:
        return "*" in values or wanted in values

    return (
        has(list(rule.get("apiGroups", [])), group)
        and has(list(rule.get("resources", [])), resource)
        and has(list(rule.get("verbs", [])), verb)
    )


def check(tree: Tree) -> list[Finding]:
    table = tree.permissions.get("serviceAccounts") or {}
    if not table:
        return [Finding(CHECK, PERMISSIONS_FILE, "no table of the permissions each ServiceAccount needs")]
    out = []
    accounts = tree.names("ServiceAccount")
    for account, needs in table.items():
        if account not in accounts:
            out.append(
                Finding(CHECK, PERMISSIONS_FILE, f"ServiceAccount {account} is created by no manifest")
            )
            continue
        rules = _rules_of(tree, account)
        for need in needs or []:
            group, resource = str(need.get("apiGroup", "")), str(need["resource"])
            missing = [
                v for v in need.get("verbs", []) if not any(_covers(r, group, resource, v) for r in rules)
            ]
            if missing:
                out.append(
                    Finding(
                        CHECK,
                        f"ServiceAccount {account}",
                        f"may not {','.join(missing)} {resource}.{group or 'core'} ({need.get('why', '')})",
                    )
                )
    used = {
        str(p.spec.get("serviceAccountName"))
        for p in tree.pods
        if p.namespace == NAMESPACE and ("WorkflowTemplate" in p.owner or "CronWorkflow" in p.owner)
    }
    for account in sorted(used - set(table) - {"default", "None"}):
        out.append(
            Finding(CHECK, PERMISSIONS_FILE, f"workflow ServiceAccount {account} has no row in the table")
        )
    return out
