"""The nodes the provisioning makes: pools and sizes from Terraform, labels and taints from Ansible.

Each Ansible group that describes a pool (``iac/ansible/inventory/group_vars/<group>.yml``)
carries ``node_pool``, ``node_labels``, ``node_taints``, ``node_capacity`` (instance type, CPU,
memory, advertised ``nvidia.com/gpu``) and ``node_terraform`` (which Terraform variables hold
the pool's count and instance type). The counts and types are the defaults of those variables
in ``iac/terraform/envs/dev/variables.tf``; a pool whose instance type there differs from the
one its capacity describes is reported, since its numbers would then be wrong.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from delivery.cluster_fit.inputs import read_hcl, read_yaml

GROUP_VARS = "iac/ansible/inventory/group_vars"
TERRAFORM_VARIABLES = "iac/terraform/envs/dev/variables.tf"


@dataclass(frozen=True)
class Taint:
    key: str
    value: str
    effect: str


@dataclass(frozen=True)
class NodePool:
    name: str
    count: int
    cpu: float
    memory_gib: float
    gpus: int = 0  # nvidia.com/gpu the device plugin advertises per node (time-slices included)
    labels: dict[str, str] = field(default_factory=dict)
    taints: tuple[Taint, ...] = ()
    instance_type: str = ""
    terraform_instance_type: str = ""  # what Terraform creates by default; must equal instance_type


def _unquote(value: Any) -> Any:
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    return value


def terraform_defaults(root: Path) -> dict[str, Any]:
    """Variable name -> default, from the environment's variables.tf (python-hcl2)."""
    path = root / TERRAFORM_VARIABLES
    if not path.exists():
        return {}
    parsed = read_hcl(path)
    defaults = {}
    for block in parsed.get("variable", []):
        for name, body in block.items():
            if "default" in body:
                defaults[_unquote(name)] = _unquote(body["default"])
    return defaults


def _pool(data: dict[str, Any], defaults: dict[str, Any]) -> NodePool:
    capacity = data.get("node_capacity") or {}
    terraform = data.get("node_terraform") or {}
    count_var = terraform.get("count_variable")
    count = int(defaults.get(count_var, 0)) if count_var else 1
    return NodePool(
        name=str(data["node_pool"]),
        count=count,
        cpu=float(capacity.get("cpu", 0)),
        memory_gib=float(capacity.get("memory_gib", 0)),
        gpus=int(capacity.get("nvidia_gpu", 0)),
        labels={str(k): str(v) for k, v in (data.get("node_labels") or {}).items()},
        taints=tuple(
            Taint(str(t["key"]), str(t.get("value", "")), str(t["effect"]))
            for t in data.get("node_taints") or []
        ),
        instance_type=str(capacity.get("instance_type", "")),
        terraform_instance_type=str(defaults.get(str(terraform.get("instance_type_variable")), "")),
    )


def load_node_pools(root: Path) -> list[NodePool]:
    defaults = terraform_defaults(root)
    pools = []
    for path in sorted((root / GROUP_VARS).glob("*.yml")):
        data = read_yaml(path) or {}
        if isinstance(data, dict) and data.get("node_pool"):
            pools.append(_pool(data, defaults))
    return pools
