"""The cluster-fit check: every manifest, role and image of the cluster path checked against the others.

Schema validation sees one object at a time; these checks read the whole tree (rendered
Kustomize output, the retrain templates and the RayJob inside them, the platform charts'
values, Ansible's node labels and taints, Terraform's node pools) and ask whether the parts
fit: names that resolve, permissions that cover what each step does, pods that land on some
node, Pod Security, network edges, images built here, Prometheus selecting every monitor.
``cxr cluster check`` runs it; ``tests/unit/cluster`` runs it on the tree and on seeded defects.
"""
