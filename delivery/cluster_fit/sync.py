"""What Argo CD syncs: every Application path exists, every deployable folder is synced, waves order.

A folder under k8s/ with a kustomization.yaml is deployable unless another kustomization
includes it (bases) or the Ansible bootstrap applies it (k8s/argocd). Sync-wave annotations on
Applications an ApplicationSet generates order nothing, so the ApplicationSet must use the
RollingSync strategy to order its stages (and Argo CD must run with progressive syncs on).
"""

from __future__ import annotations

from pathlib import Path

from delivery.cluster_fit.findings import Finding
from delivery.cluster_fit.inputs import read_mapping
from delivery.cluster_fit.tree import Tree

CHECK = "sync"
BOOTSTRAPPED = {"k8s/argocd"}  # applied by iac/ansible/roles/argocd
OWN_REPO = "cxr-detect.git"  # Applications with a path in another repository (a chart) are not ours


def _app_paths(tree: Tree) -> list[tuple[str, str]]:
    paths = []
    for obj in tree.of_kind("Application"):
        source = obj.doc.get("spec", {}).get("source", {})
        if source.get("path") and str(source.get("repoURL", "")).rstrip("/").endswith(OWN_REPO):
            paths.append((obj.ref(), str(source["path"])))
    for obj in tree.of_kind("ApplicationSet"):
        for gen in obj.doc.get("spec", {}).get("generators", []):
            for element in gen.get("list", {}).get("elements", []):
                if "path" in element:
                    paths.append((obj.ref(), str(element["path"])))
    return paths


def _included(root: Path) -> set[str]:
    """Folders some kustomization lists as a resource (so they are deployed through it)."""
    included = set()
    for kfile in (root / "k8s").rglob("kustomization.yaml"):
        data = read_mapping(kfile)
        for res in data.get("resources", []) or []:
            target = (kfile.parent / str(res)).resolve()
            if target.is_dir():
                included.add(target.relative_to(root.resolve()).as_posix())
    return included


def check(tree: Tree) -> list[Finding]:
    root = tree.root
    out = []
    synced = set()
    for where, path in _app_paths(tree):
        synced.add(path)
        if not (root / path / "kustomization.yaml").exists():
            out.append(Finding(CHECK, where, f"syncs {path}, which has no kustomization.yaml"))
    included = _included(root)
    for kfile in sorted((root / "k8s").rglob("kustomization.yaml")):
        folder = kfile.parent.relative_to(root).as_posix()
        if folder not in synced and folder not in included and folder not in BOOTSTRAPPED:
            out.append(Finding(CHECK, folder, "is deployed by nothing: no Application syncs it"))
    out += _repository(tree)
    for appset in tree.of_kind("ApplicationSet"):
        spec = appset.doc.get("spec", {})
        annotations = spec.get("template", {}).get("metadata", {}).get("annotations") or {}
        if "argocd.argoproj.io/sync-wave" in annotations:
            out.append(Finding(CHECK, appset.ref(), "sync-wave on generated Applications orders nothing"))
        if spec.get("strategy", {}).get("type") != "RollingSync":
            out.append(
                Finding(CHECK, appset.ref(), "no RollingSync strategy: its Applications sync in no order")
            )
    return out


def _repository(tree: Tree) -> list[Finding]:
    """The repository Argo CD is given credentials for is the one every Application syncs."""
    group_vars = tree.root / "iac/ansible/inventory/group_vars/all.yml"
    given = str(read_mapping(group_vars).get("argocd_repo_url", "")) if group_vars.exists() else ""
    own = [source for source in _sources(tree) if source[2].rstrip("/").endswith(OWN_REPO)]
    out = [
        Finding(CHECK, where, f"syncs {url}, but Ansible gives Argo CD credentials for {given}")
        for where, _, url in own
        if url != given
    ]
    ours = {project for _, project, _ in own}
    for project in tree.of_kind("AppProject"):
        if project.name in ours and given not in project.doc.get("spec", {}).get("sourceRepos", []):
            out.append(Finding(CHECK, project.ref(), f"does not allow the repository {given}"))
    return out + _projects(tree)


def _sources(tree: Tree) -> list[tuple[str, str, str]]:
    """(where, project, repoURL) of every Application and ApplicationSet template."""
    specs = [(o.ref(), o.doc.get("spec", {})) for o in tree.of_kind("Application")]
    specs += [
        (o.ref(), o.doc.get("spec", {}).get("template", {}).get("spec", {}))
        for o in tree.of_kind("ApplicationSet")
    ]
    return [
        (where, str(s.get("project", "default")), str(s.get("source", {}).get("repoURL", "")))
        for where, s in specs
    ]


def _projects(tree: Tree) -> list[Finding]:
    """Every Application sits in a project of ours that admits its repository, never in ``default``
    (Argo CD's own, which admits any repository, namespace and kind unless k8s/argocd locks it)."""
    projects = {p.name: p.doc.get("spec", {}) for p in tree.of_kind("AppProject")}
    out = []
    for where, name, url in _sources(tree):
        if name == "default":
            out.append(Finding(CHECK, where, "is in Argo CD's default project, which admits anything"))
        elif name not in projects:
            out.append(Finding(CHECK, where, f"names the project {name}, which k8s/argocd does not define"))
        elif url not in projects[name].get("sourceRepos", []):
            out.append(Finding(CHECK, where, f"syncs {url}, which its project {name} does not allow"))
    return out
