"""One project image, built and pushed by this repository; every other image pinned by tag.

The name comes from the Makefile (``IMAGE``/``IMAGE_TAG``, what ``make image`` builds); the CI
workflow must push that same name, and every pod, workflow step and compose service that runs
project code must use it.
"""

from __future__ import annotations

import re
from pathlib import Path

from delivery.cluster_fit.findings import Finding
from delivery.cluster_fit.inputs import read_mapping
from delivery.cluster_fit.tree import Tree

CHECK = "images"
PROJECT_REGISTRY = "ghcr.io/cxr-detect/"
CI_WORKFLOW = ".github/workflows/image.yml"


def make_image(root: Path) -> str:
    """``IMAGE:IMAGE_TAG`` as the Makefile defines them, "" when it defines no image."""
    text = (root / "Makefile").read_text() if (root / "Makefile").exists() else ""
    values = dict(re.findall(r"^(IMAGE|IMAGE_TAG)\s*\?=\s*(\S+)\s*$", text, flags=re.M))
    if "IMAGE" not in values or "IMAGE_TAG" not in values or not re.search(r"^image:", text, flags=re.M):
        return ""
    return f"{values['IMAGE']}:{values['IMAGE_TAG']}"


def _named_images(tree: Tree) -> list[tuple[str, str]]:
    found = [
        (pod.owner, str(c.get("image"))) for pod in tree.pods for c in pod.containers() if c.get("image")
    ]
    found = [(w, i) for w, i in found if i != "argoexec"]
    compose = tree.root / "docker-compose.yaml"
    if compose.exists():
        services = read_mapping(compose).get("services", {})
        found += [
            (f"docker-compose service {n}", str(s["image"])) for n, s in services.items() if "image" in s
        ]
    return found


def check(tree: Tree) -> list[Finding]:
    built = make_image(tree.root)
    out = []
    if not built:
        out.append(
            Finding(
                CHECK, "Makefile", "no `image` target with IMAGE ?= and IMAGE_TAG ?= builds the project image"
            )
        )
    workflow = tree.root / CI_WORKFLOW
    if not workflow.exists():
        out.append(Finding(CHECK, CI_WORKFLOW, "no CI workflow builds and pushes the project image"))
    else:
        text = workflow.read_text()
        if "build-push-action" not in text or not (built.split(":")[0] in text or "$(IMAGE)" in text):
            out.append(Finding(CHECK, CI_WORKFLOW, f"does not build and push {built.split(':')[0]}"))
    out += _runtime_contents(tree)
    for where, image in _named_images(tree):
        if image.startswith(PROJECT_REGISTRY):
            if built and image != built:
                out.append(Finding(CHECK, where, f"runs {image}, but this repository builds {built}"))
        elif ":" not in image.rsplit("/", 1)[-1] or image.endswith(":latest"):
            out.append(Finding(CHECK, where, f"image {image} is not pinned to a version"))
    return out


def _runtime_contents(tree: Tree) -> list[Finding]:
    """What the pods ask of the image is in it: ssh for git pushes, the DB driver MLflow's URI names."""
    dockerfile = (tree.root / "Dockerfile").read_text() if (tree.root / "Dockerfile").exists() else ""
    pyproject = (tree.root / "pyproject.toml").read_text() if (tree.root / "pyproject.toml").exists() else ""
    texts = [
        " ".join(str(x) for x in [*c.get("command", []), *c.get("args", [])])
        + " "
        + " ".join(str(e.get("value", "")) for e in c.get("env", []) if e.get("name") != "CXR_WORKLIST_URL")
        for pod in tree.pods
        for c in pod.containers()
        if str(c.get("image", "")).startswith(PROJECT_REGISTRY)
    ]
    out = []
    if any("GIT_SSH_COMMAND" in t or "git@" in t for t in texts) and "openssh-client" not in dockerfile:
        out.append(
            Finding(CHECK, "Dockerfile", "pods push to git over SSH, but the image has no openssh-client")
        )
    # ssh exits "No user exists for uid" where the UID has no passwd entry: only our image has 10001
    for pod in tree.pods:
        for c in pod.containers():
            uses_ssh = any(e.get("name") == "GIT_SSH_COMMAND" for e in c.get("env", []))
            if uses_ssh and not str(c.get("image", "")).startswith(PROJECT_REGISTRY):
                problem = f"runs ssh in {c.get('image')}, whose passwd lacks the pod's UID"
                out.append(Finding(CHECK, pod.owner, problem))
    for text in texts:
        match = re.search(r"postgresql(?:\+(\w+))?://", text)
        if not match:
            continue
        driver = match.group(1) or "psycopg2"
        if driver not in pyproject or '".[cluster]"' not in dockerfile:
            out.append(
                Finding(CHECK, "Dockerfile", f"MLflow's postgresql URI needs {driver}, not in the image")
            )
            break
    # the gateway's shared worklist: a libpq URL that psycopg (3) and its pool open, not SQLAlchemy's
    worklist = any(
        e.get("name") == "CXR_WORKLIST_URL" and e.get("value")
        for pod in tree.pods
        for c in pod.containers()
        if str(c.get("image", "")).startswith(PROJECT_REGISTRY)
        for e in c.get("env", [])
    )
    cluster_extra = re.search(r"^cluster = \[(.*)\]$", pyproject, re.MULTILINE)
    needed = {"psycopg[binary]", "psycopg-pool"}
    held = set(re.findall(r'"([^"]+)"', cluster_extra.group(1))) if cluster_extra else set()
    if worklist and (not needed <= held or '".[cluster]"' not in dockerfile):
        missing = ", ".join(sorted(needed - held)) or "the cluster extra"
        out.append(
            Finding(CHECK, "Dockerfile", f"the gateway's worklist URL needs {missing}, not in the image")
        )
    return out
