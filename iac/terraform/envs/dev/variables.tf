################################################################################
# Where
################################################################################

variable "region" {
  description = "AWS region."
  type        = string
  default     = "eu-central-1"
}

variable "availability_zones" {
  description = "Availability zones of the region to use (listed, not looked up, so plan runs offline)."
  type        = list(string)
  default     = ["eu-central-1a", "eu-central-1b"]
}

variable "environment" {
  description = "Environment name; part of every resource name."
  type        = string
  default     = "dev"
}

variable "owner" {
  description = "Team or person answerable for these resources (Owner tag)."
  type        = string
  default     = "platform"
}

################################################################################
# Access
################################################################################

variable "admin_cidrs" {
  description = "Networks allowed to reach SSH and the Kubernetes API (e.g. your office's /32)."
  type        = list(string)
}

variable "ssh_public_key" {
  description = "OpenSSH public key for the nodes' login user."
  type        = string
}

################################################################################
# Nodes
################################################################################

variable "ami_id" {
  description = "Ubuntu 22.04/24.04 amd64 AMI of the region (see README for the lookup command)."
  type        = string
}

variable "control_plane_instance_type" {
  description = "Control-plane instance type."
  type        = string
  default     = "m6i.xlarge"
}

variable "gpu_worker_instance_type" {
  description = "GPU worker instance type."
  type        = string
  default     = "g5.xlarge"
}

variable "gpu_worker_count" {
  description = "Number of GPU workers."
  type        = number
  default     = 2
}

variable "gpu_worker_data_volume_gb" {
  description = "Data volume per GPU worker, GiB (0 = none)."
  type        = number
  default     = 200
}
