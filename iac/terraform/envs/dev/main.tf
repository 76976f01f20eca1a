# The dev cluster: one CPU control plane, two untainted CPU workers and two GPU workers.
# Credentials come from the environment (AWS_PROFILE / AWS_ACCESS_KEY_ID ...),
# never from this folder.

provider "aws" {
  region = var.region

  default_tags {
    tags = {
      Environment = var.environment
    }
  }
}

module "cluster" {
  source = "../../modules/cluster"

  name               = "cxr-${var.environment}"
  availability_zones = var.availability_zones
  admin_cidrs        = var.admin_cidrs
  ami_id             = var.ami_id
  ssh_public_key     = var.ssh_public_key

  git_ssh_cidrs = var.git_ssh_cidrs
  client_cidrs  = var.client_cidrs

  ingress_https_node_port = var.ingress_https_node_port

  pacs_cidrs      = var.pacs_cidrs
  dimse_node_port = var.dimse_node_port
  pacs_ports      = var.pacs_ports

  control_plane_instance_type  = var.control_plane_instance_type
  system_worker_instance_type  = var.system_worker_instance_type
  system_worker_count          = var.system_worker_count
  system_worker_data_volume_gb = var.system_worker_data_volume_gb
  gpu_worker_instance_type     = var.gpu_worker_instance_type
  gpu_worker_count             = var.gpu_worker_count
  gpu_worker_data_volume_gb    = var.gpu_worker_data_volume_gb

  tags = {
    Owner = var.owner
  }
}
