#!/usr/bin/env python3
"""Ansible dynamic inventory built from the Terraform outputs of iac/terraform/envs/<env>.

Why a script rather than a static hosts file: node addresses exist only after
`terraform apply`, and copying them by hand is how a worker ends up missing
from the cluster. This reads `terraform output -json` (or a saved copy of it)
and prints the inventory Ansible asks for:

- group ``control_plane``: the control-plane node, reached on its public IP;
- group ``system_workers``: untainted CPU workers (pool "system");
- group ``gpu_workers``: GPU workers (pool "gpu");
- group ``k8s_cluster``: all three, the target of the common roles.

Workers are reached on their private IPs through the control plane as SSH jump
host (they have no public address). Each group's labels, taints and capacity
are in ``group_vars/<group>.yml`` (node_labels, node_taints, node_capacity).

Where the outputs come from (first match wins):
  CXR_TF_OUTPUTS_JSON  a file holding `terraform output -json` (CI, or a laptop without state access)
  CXR_TF_DIR           the Terraform root to run `terraform output -json` in
  default              ../../terraform/envs/dev next to this file

Only the Python standard library is used, so it runs with whatever Python Ansible runs on.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

DEFAULT_TF_DIR = Path(__file__).resolve().parents[2] / "terraform" / "envs" / "dev"
# Terraform output name == Ansible group name, one per worker pool (system first: it joins first).
WORKER_GROUPS = ("system_workers", "gpu_workers")


class InventoryError(Exception):
    """The Terraform outputs are missing or incomplete; the message says what to run."""


def _value(outputs: dict[str, Any], name: str) -> Any:
    """`terraform output -json` wraps each output as {"value": ..., "type": ..., "sensitive": ...}."""
    if name not in outputs:
        raise InventoryError(
            f"terraform output {name!r} is missing; run `terraform apply` in iac/terraform/envs/<env> first"
        )
    entry = outputs[name]
    return entry["value"] if isinstance(entry, dict) and "value" in entry else entry


def load_outputs() -> dict[str, Any]:
    """Read the outputs from CXR_TF_OUTPUTS_JSON or by running `terraform output -json`."""
    saved = os.environ.get("CXR_TF_OUTPUTS_JSON")
    if saved:
        path = Path(saved)
        if not path.is_file():
            raise InventoryError(f"CXR_TF_OUTPUTS_JSON={saved} does not exist")
        return json.loads(path.read_text())
    tf_dir = Path(os.environ.get("CXR_TF_DIR", str(DEFAULT_TF_DIR)))
    try:
        proc = subprocess.run(
            ["terraform", f"-chdir={tf_dir}", "output", "-json"],
            capture_output=True,
            text=True,
            check=False,
        )
    except FileNotFoundError as exc:
        raise InventoryError("terraform is not on PATH; install it or set CXR_TF_OUTPUTS_JSON") from exc
    if proc.returncode != 0:
        raise InventoryError(f"`terraform output -json` in {tf_dir} failed: {proc.stderr.strip()}")
    outputs = json.loads(proc.stdout or "{}")
    if not outputs:
        raise InventoryError(f"{tf_dir} has no outputs yet; run `terraform apply` there first")
    return outputs


def build_inventory(outputs: dict[str, Any]) -> dict[str, Any]:
    """The JSON inventory (`--list` format, with `_meta.hostvars`) for these outputs."""
    user = _value(outputs, "ssh_user")
    control = _value(outputs, "control_plane")
    pools = {group: _value(outputs, group) or [] for group in WORKER_GROUPS}
    api = _value(outputs, "kubernetes_api_endpoint")
    if not control.get("public_ip"):
        raise InventoryError("the control plane has no public IP yet; wait for `terraform apply` to finish")
    jump = f"{user}@{control['public_ip']}"
    hostvars: dict[str, dict[str, Any]] = {
        control["name"]: {
            "ansible_host": control["public_ip"],
            "ansible_user": user,
            "node_private_ip": control["private_ip"],
            "node_public_ip": control["public_ip"],
        }
    }
    for worker in (w for workers in pools.values() for w in workers):
        hostvars[worker["name"]] = {
            "ansible_host": worker["private_ip"],
            "ansible_user": user,
            "node_private_ip": worker["private_ip"],
            "node_instance_type": worker.get("instance_type", ""),
            # private subnet: reach it through the control plane (the only host open to the admin CIDRs)
            "ansible_ssh_common_args": f"-o ProxyJump={jump}",
        }
    groups = {group: {"hosts": [w["name"] for w in workers]} for group, workers in pools.items()}
    return {
        "_meta": {"hostvars": hostvars},
        "all": {
            "children": ["k8s_cluster"],
            "vars": {
                "kubernetes_api_endpoint": api,
                "artifact_bucket": _value(outputs, "artifact_bucket") if "artifact_bucket" in outputs else "",
            },
        },
        "k8s_cluster": {"children": ["control_plane", *WORKER_GROUPS]},
        "control_plane": {"hosts": [control["name"]]},
        **groups,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--list", action="store_true", help="print the whole inventory")
    group.add_argument("--host", help="print one host's variables")
    args = parser.parse_args(argv)
    try:
        inventory = build_inventory(load_outputs())
    except (InventoryError, KeyError, TypeError, json.JSONDecodeError) as exc:
        print(f"terraform_inventory: {exc}", file=sys.stderr)
        return 1
    if args.host:
        print(json.dumps(inventory["_meta"]["hostvars"].get(args.host, {})))
    else:
        print(json.dumps(inventory, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
