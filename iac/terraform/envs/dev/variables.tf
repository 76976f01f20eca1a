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

variable "git_ssh_cidrs" {
  description = "CIDRs of the git server (git.hospital.example) the nodes may reach on SSH (22): ArgoCD pulls, promotions push. Default: the hospital's private network behind the site VPN (narrow it per site)."
  type        = list(string)
  default     = ["10.0.0.0/8"]
}

################################################################################
# Nodes: the defaults are the node layout of docs/cluster.md (labels, taints and
# capacity per pool in iac/ansible/inventory/group_vars/).
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

variable "system_worker_instance_type" {
  description = "Instance type of the untainted CPU workers (pool \"system\"): 8 vCPU, 32 GiB."
  type        = string
  default     = "m6i.2xlarge"
}

variable "system_worker_count" {
  description = "Number of untainted CPU workers (pool \"system\")."
  type        = number
  default     = 2
}

variable "system_worker_data_volume_gb" {
  description = "Data volume per system worker, GiB (0 = none): MinIO claims 200 GiB and PostgreSQL 20 GiB on it (k8s/base), local-path does not enforce sizes."
  type        = number
  default     = 300
}

variable "gpu_worker_instance_type" {
  description = "GPU worker instance type (pool \"gpu\"): 8 vCPU, 32 GiB, 1x A10G time-sliced into 4 nvidia.com/gpu."
  type        = string
  default     = "g5.2xlarge"
}

variable "gpu_worker_count" {
  description = "Number of GPU workers (pool \"gpu\")."
  type        = number
  default     = 2
}

variable "gpu_worker_data_volume_gb" {
  description = "Data volume per GPU worker, GiB (0 = none)."
  type        = number
  default     = 200
}

variable "client_cidrs" {
  description = "CIDRs of the hospital network whose PACS and radiologists reach the gateway through the ingress controller's HTTPS NodePort (var.ingress_https_node_port) on the nodes. Default: the private network 10.0.0.0/8 behind the site VPN, as for git_ssh_cidrs. Empty = the gateway is reachable only from inside the VPC."
  type        = list(string)
  default     = ["10.0.0.0/8"]

  validation {
    condition     = alltrue([for c in var.client_cidrs : try(cidrsubnet(c, 0, 0) == c && tonumber(split("/", c)[1]) >= 8, false)])
    error_message = "client_cidrs must be valid CIDRs of the hospital network, written as network addresses and no wider than /8, never 0.0.0.0/0 (patient images must not face the internet)."
  }
}

variable "ingress_https_node_port" {
  description = "The HTTPS NodePort of ingress-nginx (k8s/platform/ingress-nginx.yaml controller.service.nodePorts.https)."
  type        = number
  default     = 30443
}

variable "pacs_cidrs" {
  description = "CIDRs of the hospital's PACS and modalities: they reach the DIMSE storage SCP on its NodePort (var.dimse_node_port) on the nodes, and the gateway sends results back to (and pulls studies from) the PACS on var.pacs_ports. Default: the private network 10.0.0.0/8 behind the site VPN, as for client_cidrs; keep the NetworkPolicies' PACS blocks (k8s/base/network/dimse-networkpolicy.yaml, gateway-networkpolicy.yaml) inside it. Empty = no PACS traffic in or out."
  type        = list(string)
  default     = ["10.0.0.0/8"]

  validation {
    condition     = alltrue([for c in var.pacs_cidrs : try(cidrsubnet(c, 0, 0) == c && tonumber(split("/", c)[1]) >= 8, false)])
    error_message = "pacs_cidrs must be valid CIDRs of the hospital network, written as network addresses and no wider than /8, never 0.0.0.0/0 (patient images must not face the internet)."
  }
}

variable "dimse_node_port" {
  description = "The NodePort of the DIMSE storage SCP (k8s/base/dimse/service.yaml nodePort), where the PACS sends studies by C-STORE."
  type        = number
  default     = 31112
}

variable "pacs_ports" {
  description = "TCP ports the nodes may reach on var.pacs_cidrs: the PACS's DIMSE (104, 4242, 11112) and DICOMweb over HTTP (8042); HTTPS (443) is open anywhere already. The same ports as the gateway's PACS rule (k8s/base/network/gateway-networkpolicy.yaml)."
  type        = list(number)
  default     = [104, 4242, 8042, 11112]
}
