# Everything Ansible's inventory needs (iac/ansible/inventory/terraform_inventory.py
# reads `terraform output -json` of this folder).

output "ssh_user" {
  description = "Login user of the nodes."
  value       = module.cluster.ssh_user
}

output "control_plane" {
  description = "Control-plane node (public IP for SSH/API, private IP for the cluster)."
  value       = module.cluster.control_plane
}

output "system_workers" {
  description = "Untainted CPU workers (private IPs, reached through the control plane)."
  value       = module.cluster.system_workers
}

output "gpu_workers" {
  description = "GPU workers (private IPs, reached through the control plane)."
  value       = module.cluster.gpu_workers
}

output "kubernetes_api_endpoint" {
  description = "Kubernetes API URL."
  value       = module.cluster.kubernetes_api_endpoint
}

output "artifact_bucket" {
  description = "Artifact/backup bucket."
  value       = module.cluster.artifact_bucket
}

output "region" {
  description = "AWS region."
  value       = var.region
}
