################################################################################
# Network
################################################################################

output "vpc_id" {
  description = "ID of the VPC."
  value       = aws_vpc.this.id
}

output "public_subnet_ids" {
  description = "IDs of the public subnets (control plane, load balancers)."
  value       = aws_subnet.public[*].id
}

output "private_subnet_ids" {
  description = "IDs of the private subnets (system and GPU workers)."
  value       = aws_subnet.private[*].id
}

output "nodes_security_group_id" {
  description = "Security group shared by every node (node-to-node traffic)."
  value       = aws_security_group.nodes.id
}

################################################################################
# Nodes (read by iac/ansible/inventory/terraform_inventory.py)
################################################################################

output "ssh_user" {
  description = "Login user of the nodes."
  value       = var.ssh_user
}

output "control_plane" {
  description = "The control-plane node: name, public IP (SSH / API / jump host) and private IP."
  value = {
    name       = aws_instance.control_plane.tags["Name"]
    public_ip  = aws_instance.control_plane.public_ip
    private_ip = aws_instance.control_plane.private_ip
  }
}

output "system_workers" {
  description = "Untainted CPU workers (pool \"system\"): name, private IP and instance type (reached through the control plane as jump host)."
  value = [for w in aws_instance.system_worker : {
    name          = w.tags["Name"]
    private_ip    = w.private_ip
    instance_type = w.instance_type
  }]
}

output "gpu_workers" {
  description = "GPU workers: name, private IP and instance type (reached through the control plane as jump host)."
  value = [for w in aws_instance.gpu_worker : {
    name          = w.tags["Name"]
    private_ip    = w.private_ip
    instance_type = w.instance_type
  }]
}

output "kubernetes_api_endpoint" {
  description = "URL of the Kubernetes API (kubeadm's controlPlaneEndpoint and the kubeconfig server)."
  value       = "https://${aws_instance.control_plane.public_ip}:6443"
}

################################################################################
# Storage / IAM
################################################################################

output "artifact_bucket" {
  description = "Name of the artifact/backup bucket."
  value       = aws_s3_bucket.artifacts.id
}

output "artifact_bucket_region" {
  description = "Region of the artifact bucket."
  value       = aws_s3_bucket.artifacts.region
}

output "kms_key_arn" {
  description = "ARN of the key encrypting volumes and the bucket."
  value       = aws_kms_key.this.arn
}

output "node_role_arn" {
  description = "IAM role of the nodes."
  value       = aws_iam_role.node.arn
}
