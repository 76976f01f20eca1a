# Least privilege on the wire:
# - from outside: only SSH (22) and the Kubernetes API (6443) on the control
#   plane, and only from var.admin_cidrs; the gateway's HTTPS through the
#   ingress controller's NodePort on the nodes, only from var.client_cidrs; the DIMSE storage
#   SCP's NodePort, only from var.pacs_cidrs (the PACS and modalities);
# - inside: nodes talk to each other freely (kubelet, CNI overlay, NodePorts,
#   NCCL between Ray workers) through one self-referencing "nodes" group;
# - out: HTTPS/HTTP to fetch packages, images and drivers (through the NAT for
#   private nodes), SSH (22) to the git server only (var.git_ssh_cidrs: ArgoCD
#   pulls and the promotion jobs push over SSH), the PACS's DIMSE and DICOMweb ports on
#   var.pacs_cidrs only (results sent back, the pull) and anything inside the VPC.
#   DNS and NTP go to the VPC resolver / Amazon Time Sync, which security
#   groups do not filter.

resource "aws_security_group" "nodes" {
  name        = "${var.name}-nodes"
  description = "Every cluster node: node-to-node traffic and outbound package/image pulls"
  vpc_id      = aws_vpc.this.id

  tags = merge(local.tags, { Name = "${var.name}-nodes" })
}

resource "aws_vpc_security_group_ingress_rule" "nodes_from_nodes" {
  security_group_id            = aws_security_group.nodes.id
  description                  = "Node-to-node: kubelet, CNI overlay, NodePorts, NCCL"
  referenced_security_group_id = aws_security_group.nodes.id
  ip_protocol                  = "-1"

  tags = local.tags
}

resource "aws_vpc_security_group_egress_rule" "nodes_https" {
  security_group_id = aws_security_group.nodes.id
  description       = "HTTPS: container registries, apt repositories, NVIDIA, S3"
  cidr_ipv4         = "0.0.0.0/0"
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443

  tags = local.tags
}

resource "aws_vpc_security_group_egress_rule" "nodes_http" {
  security_group_id = aws_security_group.nodes.id
  description       = "HTTP: Ubuntu apt mirrors (packages are signed)"
  cidr_ipv4         = "0.0.0.0/0"
  ip_protocol       = "tcp"
  from_port         = 80
  to_port           = 80

  tags = local.tags
}

resource "aws_vpc_security_group_egress_rule" "nodes_git_ssh" {
  for_each = toset(var.git_ssh_cidrs)

  security_group_id = aws_security_group.nodes.id
  description       = "SSH to the git server: ArgoCD pulls, promotions push the GitOps repository"
  cidr_ipv4         = each.value
  ip_protocol       = "tcp"
  from_port         = 22
  to_port           = 22

  tags = local.tags
}

resource "aws_vpc_security_group_egress_rule" "nodes_vpc" {
  security_group_id = aws_security_group.nodes.id
  description       = "Anything inside the VPC"
  cidr_ipv4         = var.vpc_cidr
  ip_protocol       = "-1"

  tags = local.tags
}

resource "aws_security_group" "control_plane_admin" {
  name        = "${var.name}-control-plane-admin"
  description = "Control plane: SSH and the Kubernetes API from the admin CIDRs only"
  vpc_id      = aws_vpc.this.id

  tags = merge(local.tags, { Name = "${var.name}-control-plane-admin" })
}

resource "aws_vpc_security_group_ingress_rule" "admin_ssh" {
  for_each = toset(var.admin_cidrs)

  security_group_id = aws_security_group.control_plane_admin.id
  description       = "SSH from an admin network (also the jump host to the private GPU workers)"
  cidr_ipv4         = each.value
  ip_protocol       = "tcp"
  from_port         = 22
  to_port           = 22

  tags = local.tags
}

resource "aws_vpc_security_group_ingress_rule" "admin_kube_api" {
  for_each = toset(var.admin_cidrs)

  security_group_id = aws_security_group.control_plane_admin.id
  description       = "Kubernetes API from an admin network"
  cidr_ipv4         = each.value
  ip_protocol       = "tcp"
  from_port         = 6443
  to_port           = 6443

  tags = local.tags
}

resource "aws_vpc_security_group_ingress_rule" "clients_https" {
  for_each = toset(var.client_cidrs)

  security_group_id = aws_security_group.nodes.id
  description       = "The gateway's HTTPS (ingress-nginx NodePort) from the hospital network"
  cidr_ipv4         = each.value
  ip_protocol       = "tcp"
  from_port         = var.ingress_https_node_port
  to_port           = var.ingress_https_node_port

  tags = local.tags
}

resource "aws_vpc_security_group_ingress_rule" "pacs_dimse" {
  for_each = toset(var.pacs_cidrs)

  security_group_id = aws_security_group.nodes.id
  description       = "The DIMSE storage SCP (C-STORE NodePort) from the PACS and modalities"
  cidr_ipv4         = each.value
  ip_protocol       = "tcp"
  from_port         = var.dimse_node_port
  to_port           = var.dimse_node_port

  tags = local.tags
}

resource "aws_vpc_security_group_egress_rule" "nodes_pacs" {
  for_each = { for pair in setproduct(var.pacs_cidrs, var.pacs_ports) : "${pair[0]}:${pair[1]}" => pair }

  security_group_id = aws_security_group.nodes.id
  description       = "The PACS: results sent back (C-STORE, STOW-RS) and the DICOMweb pull"
  cidr_ipv4         = each.value[0]
  ip_protocol       = "tcp"
  from_port         = each.value[1]
  to_port           = each.value[1]

  tags = local.tags
}
