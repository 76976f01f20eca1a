"""Names that must resolve: ServiceAccounts, ConfigMaps, Secrets, StorageClasses, secret stores, Services."""

from __future__ import annotations

import re
from typing import Any

from delivery.cluster_fit.findings import Finding
from delivery.cluster_fit.tree import NAMESPACE, PodTemplate, Tree

CHECK = "references"
_SERVICE_URL = re.compile(r"\b([a-z0-9-]+)\.cxr\.svc(?:\.cluster\.local)?:(\d+)")


def _secrets(tree: Tree) -> set[str]:
    """Secrets that will exist in the namespace: plain ones and the targets of ExternalSecrets."""
    names = tree.names("Secret")
    for obj in tree.of_kind("ExternalSecret"):
        if obj.namespace == NAMESPACE:
            names.add(str(obj.doc.get("spec", {}).get("target", {}).get("name") or obj.name))
    return names


def _env_refs(pod: PodTemplate) -> list[tuple[str, str]]:
    """(kind, name) of every ConfigMap and Secret a pod's containers and volumes read."""
    refs = []
    for c in pod.containers():
        for src in c.get("envFrom", []):
            if "configMapRef" in src and not src["configMapRef"].get("optional"):
                refs.append(("ConfigMap", src["configMapRef"]["name"]))
            if "secretRef" in src and not src["secretRef"].get("optional"):
                refs.append(("Secret", src["secretRef"]["name"]))
        for env in c.get("env", []):
            frm = env.get("valueFrom", {})
            if "configMapKeyRef" in frm and not frm["configMapKeyRef"].get("optional"):
                refs.append(("ConfigMap", frm["configMapKeyRef"]["name"]))
            if "secretKeyRef" in frm and not frm["secretKeyRef"].get("optional"):
                refs.append(("Secret", frm["secretKeyRef"]["name"]))
    for vol in pod.spec.get("volumes", []):
        if "configMap" in vol and not vol["configMap"].get("optional"):
            refs.append(("ConfigMap", vol["configMap"]["name"]))
        if "secret" in vol and not vol["secret"].get("optional"):
            refs.append(("Secret", vol["secret"]["secretName"]))
        for source in vol.get("projected", {}).get("sources", []):
            if "configMap" in source:
                refs.append(("ConfigMap", source["configMap"]["name"]))
            if "secret" in source:
                refs.append(("Secret", source["secret"]["name"]))
    return refs


def _service_urls(pod: PodTemplate) -> list[tuple[str, int]]:
    found = []
    for c in pod.containers():
        texts = [str(e.get("value", "")) for e in c.get("env", [])] + [str(a) for a in c.get("args", [])]
        texts += [str(a) for a in c.get("command", [])]
        for text in texts:
            found += [(m.group(1), int(m.group(2))) for m in _SERVICE_URL.finditer(text)]
    return found


def _service_ports(tree: Tree) -> dict[str, set[int]]:
    return {
        o.name: {int(p["port"]) for p in o.doc.get("spec", {}).get("ports", [])}
        for o in tree.of_kind("Service")
        if o.namespace == NAMESPACE
    }


def _config_urls(tree: Tree) -> list[tuple[str, str, int]]:
    """Service URLs in the ConfigMaps the pods read (cxr-endpoints and the like)."""
    found = []
    for obj in tree.of_kind("ConfigMap"):
        for value in (obj.doc.get("data") or {}).values():
            found += [(obj.ref(), m.group(1), int(m.group(2))) for m in _SERVICE_URL.finditer(str(value))]
    return found


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def check(tree: Tree) -> list[Finding]:
    out: list[Finding] = []
    accounts = tree.names("ServiceAccount")
    configmaps = tree.names("ConfigMap")
    secrets = _secrets(tree)
    services = _service_ports(tree)
    pods = [p for p in tree.pods if p.namespace == NAMESPACE]
    for pod in pods:
        account = str(pod.spec.get("serviceAccountName") or "default")
        if account != "default" and account not in accounts:
            out.append(Finding(CHECK, pod.owner, f"ServiceAccount {account} is defined nowhere"))
        for kind, name in _env_refs(pod):
            if name not in (configmaps if kind == "ConfigMap" else secrets):
                out.append(
                    Finding(CHECK, pod.owner, f"{kind} {name} is defined nowhere (nor an ExternalSecret)")
                )
        for host, port in _service_urls(pod):
            if host not in services or port not in services[host]:
                out.append(Finding(CHECK, pod.owner, f"Service {host} port {port} does not exist"))
    for where, host, port in _config_urls(tree):
        if host not in services or port not in services[host]:
            out.append(Finding(CHECK, where, f"names Service {host} port {port}, which does not exist"))
    out += _ingresses(tree, services, secrets)
    out += _storage(tree)
    out += _secret_stores(tree)
    out += _secret_sources(tree)
    out += _service_selectors(tree, pods)
    return out


def _storage(tree: Tree) -> list[Finding]:
    classes = {o.name for o in tree.of_kind("StorageClass")}
    out = []
    for obj in tree.of_kind("StatefulSet", "PersistentVolumeClaim"):
        claims: list[dict[str, Any]] = (
            obj.doc.get("spec", {}).get("volumeClaimTemplates", [])
            if obj.kind == "StatefulSet"
            else [obj.doc]
        )
        for claim in claims:
            name = claim.get("spec", {}).get("storageClassName")
            if not name:
                out.append(Finding(CHECK, obj.ref(), "a volume claim names no StorageClass"))
            elif name not in classes:
                out.append(Finding(CHECK, obj.ref(), f"StorageClass {name} is installed by nothing"))
    return out


def _secret_stores(tree: Tree) -> list[Finding]:
    cluster_stores = {o.name for o in tree.of_kind("ClusterSecretStore")}
    stores = {o.name for o in tree.of_kind("SecretStore") if o.namespace == NAMESPACE}
    out = []
    for obj in tree.of_kind("ExternalSecret"):
        ref = obj.doc.get("spec", {}).get("secretStoreRef", {})
        known = cluster_stores if ref.get("kind") == "ClusterSecretStore" else stores
        if ref.get("name") not in known:
            out.append(Finding(CHECK, obj.ref(), f"{ref.get('kind')} {ref.get('name')} is defined nowhere"))
    return out


#: where the Ansible argocd role writes the values behind the ExternalSecrets (the source namespace)
_SECRET_SOURCE = "iac/ansible/roles/argocd/tasks/secrets.yml"
#: source keys a site provides itself (its own certificate, its PACS's credentials), which no
#: playbook can generate
_SITE_PROVIDED = {"cxr-gateway-tls", "cxr-pacs-credentials"}


def _secret_sources(tree: Tree) -> list[Finding]:
    """Every source key an ExternalSecret of ``cxr-secrets`` reads must be one Ansible writes.

    Without it the ExternalSecret never syncs, and every pod that reads its target waits in
    CreateContainerConfigError. Read by name from the role's Secret documents (``{name: X}`` in its
    loop, ``'name': 'X'`` in the push key's Jinja); the keys a site brings are listed above.
    """
    source = tree.root / _SECRET_SOURCE
    if not source.exists():
        return []
    text = source.read_text()
    written = set(re.findall(r"\{name: (cxr-[\w-]+)\}", text)) | set(
        re.findall(r"'name': '(cxr-[\w-]+)'", text)
    )
    out = []
    for obj in tree.of_kind("ExternalSecret"):
        spec = obj.doc.get("spec", {})
        if spec.get("secretStoreRef", {}).get("name") != "cxr-secrets":
            continue
        # named properties (data) and whole source keys (dataFrom extract)
        keys = [str(item.get("remoteRef", {}).get("key", "")) for item in spec.get("data", [])]
        keys += [str(item.get("extract", {}).get("key", "")) for item in spec.get("dataFrom", [])]
        for key in keys:
            if key and key not in written | _SITE_PROVIDED:
                out.append(
                    Finding(CHECK, obj.ref(), f"reads source key {key}, which {_SECRET_SOURCE} never writes")
                )
    return out


def _service_selectors(tree: Tree, pods: list[PodTemplate]) -> list[Finding]:
    out = []
    for svc in tree.of_kind("Service"):
        selector = svc.doc.get("spec", {}).get("selector") or {}
        if svc.namespace == NAMESPACE and selector and not any(_selects(selector, p.labels) for p in pods):
            out.append(Finding(CHECK, svc.ref(), f"selects no pod ({selector})"))
    return out


def _ingresses(tree: Tree, services: dict[str, set[int]], secrets: set[str]) -> list[Finding]:
    out = []
    for ing in tree.of_kind("Ingress"):
        spec = ing.doc.get("spec", {})
        for tls in spec.get("tls", []):
            if tls.get("secretName") not in secrets:
                out.append(
                    Finding(CHECK, ing.ref(), f"TLS Secret {tls.get('secretName')} is defined nowhere")
                )
        for rule in spec.get("rules", []):
            for path in rule.get("http", {}).get("paths", []):
                backend = path.get("backend", {}).get("service", {})
                name, port = backend.get("name"), backend.get("port", {}).get("number")
                if name not in services or port not in services[name]:
                    out.append(
                        Finding(
                            CHECK, ing.ref(), f"routes to Service {name} port {port}, which does not exist"
                        )
                    )
    return out
