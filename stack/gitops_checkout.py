"""The one-machine stack's GitOps checkout: what the local "cluster" syncs from.

``cxr promote`` commits to a GitOps repository and the stack follows the stage
files in it, as ArgoCD follows the hospital's repository. The stack keeps its
own clone (``<stack>/gitops-checkout``) instead of editing the developer's
working tree, so a newcomer's ``make up`` never writes commits into their
branch; ``cxr promote --push`` pushes from this clone to its origin.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from git import InvalidGitRepositoryError, NoSuchPathError, Repo

OVERLAYS = Path("k8s") / "overlays"


def ensure_checkout(source: Path, checkout: Path) -> Path:
    """Clone ``source`` into ``checkout`` once; later calls leave the clone as it is."""
    if (checkout / ".git").exists():
        return checkout
    try:
        origin = Repo(source, search_parent_directories=True)
        has_commits = origin.head.is_valid()
    except (InvalidGitRepositoryError, NoSuchPathError):
        origin, has_commits = None, False
    if origin is not None and has_commits and origin.working_tree_dir is not None:
        repo = Repo.clone_from(origin.working_tree_dir, checkout)
    else:
        # Not a git checkout (an unpacked release): start a repository from the overlays.
        checkout.mkdir(parents=True, exist_ok=True)
        repo = Repo.init(checkout)
        shutil.copytree(source / OVERLAYS, checkout / OVERLAYS, dirs_exist_ok=True)
        repo.index.add([str(OVERLAYS)])
        _identity(repo)
        repo.index.commit("Start the stack's GitOps repository from k8s/overlays")
    _identity(repo)
    return checkout


def _identity(repo: Repo) -> None:
    with repo.config_writer() as config:
        if not config.has_option("user", "name"):
            config.set_value("user", "name", "cxr stack")
            config.set_value("user", "email", "cxr-stack@localhost")
