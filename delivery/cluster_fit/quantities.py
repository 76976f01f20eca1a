"""Kubernetes resource quantities (``500m``, ``2Gi``) as numbers, for the capacity sums."""

from __future__ import annotations

_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
_DECIMAL = {"k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def cpu_cores(value: object) -> float:
    text = str(value or "0")
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def memory_gib(value: object) -> float:
    text = str(value or "0")
    for suffix, factor in {**_BINARY, **_DECIMAL}.items():
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor / 2**30
    return float(text) / 2**30


def requests(container: dict[str, object]) -> tuple[float, float, int]:
    """(CPU cores, memory GiB, GPUs) a container requests; GPUs count from limits as Kubernetes does."""
    resources = container.get("resources") or {}
    assert isinstance(resources, dict)
    req = resources.get("requests") or {}
    lim = resources.get("limits") or {}
    assert isinstance(req, dict) and isinstance(lim, dict)
    gpus = int(str(req.get("nvidia.com/gpu") or lim.get("nvidia.com/gpu") or 0))
    return cpu_cores(req.get("cpu")), memory_gib(req.get("memory")), gpus
