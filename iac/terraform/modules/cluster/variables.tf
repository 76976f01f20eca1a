################################################################################
# General
################################################################################

variable "name" {
  description = "Name prefix for every resource (also the value of the `Cluster` tag)."
  type        = string
  default     = "cxr"

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,20}$", var.name))
    error_message = "name must be 2-21 characters of lowercase letters, digits and '-', starting with a letter."
  }
}

variable "tags" {
  description = "Extra tags added to every resource."
  type        = map(string)
  default     = {}
}

################################################################################
# Network
################################################################################

variable "vpc_cidr" {
  description = "CIDR block of the VPC. Public and private subnets are carved out of it (/20 each)."
  type        = string
  default     = "10.42.0.0/16"

  validation {
    condition     = can(cidrhost(var.vpc_cidr, 0)) && tonumber(split("/", var.vpc_cidr)[1]) <= 18
    error_message = "vpc_cidr must be a valid IPv4 CIDR of /18 or larger (it is split into /20 subnets)."
  }
}

variable "availability_zones" {
  description = "Availability zones to spread subnets over (named explicitly so that `plan` never asks AWS)."
  type        = list(string)
  default     = ["eu-central-1a", "eu-central-1b"]

  validation {
    condition     = length(var.availability_zones) >= 1 && length(var.availability_zones) <= 4
    error_message = "Give between 1 and 4 availability zones."
  }
}

variable "admin_cidrs" {
  description = "CIDRs allowed to reach SSH (22) and the Kubernetes API (6443) on the control plane. Nothing else is open from outside."
  type        = list(string)

  validation {
    condition     = length(var.admin_cidrs) > 0 && alltrue([for c in var.admin_cidrs : try(cidrsubnet(c, 0, 0) == c && tonumber(split("/", c)[1]) >= 8, false)])
    error_message = "admin_cidrs must hold at least one valid CIDR, written as its network address and no wider than /8, and never 0.0.0.0/0 (SSH and the API server would face the internet)."
  }
}

variable "git_ssh_cidrs" {
  description = "CIDRs of the git server holding the GitOps repository (git.hospital.example), reached on SSH (22) by ArgoCD (pull) and the promotion jobs (push). Default: the hospital's private network 10.0.0.0/8 behind the site VPN / Direct Connect (the route is the site's, not this module's; the same block the delivery NetworkPolicy allows). Narrow it to the server per site. Empty = no SSH egress."
  type        = list(string)
  default     = ["10.0.0.0/8"]

  validation {
    condition     = alltrue([for c in var.git_ssh_cidrs : try(cidrsubnet(c, 0, 0) == c && tonumber(split("/", c)[1]) >= 8, false)])
    error_message = "git_ssh_cidrs must be valid CIDRs of the git server, written as network addresses and no wider than /8, never 0.0.0.0/0 (SSH egress to the whole internet)."
  }
}

################################################################################
# Compute
################################################################################

variable "ami_id" {
  description = "AMI for every node (Ubuntu 22.04/24.04 LTS amd64 recommended). Given explicitly: no AMI lookup, so plans are reproducible and work offline."
  type        = string

  validation {
    condition     = can(regex("^ami-[0-9a-f]{8,17}$", var.ami_id))
    error_message = "ami_id must look like ami-0123456789abcdef0."
  }
}

variable "ssh_public_key" {
  description = "OpenSSH public key installed for the nodes' login user (the private half stays with the operator and Ansible)."
  type        = string

  validation {
    condition     = can(regex("^(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp(256|384|521)) [A-Za-z0-9+/=]+", var.ssh_public_key))
    error_message = "ssh_public_key must be an OpenSSH public key line (ssh-ed25519 AAAA... or ssh-rsa AAAA...)."
  }
}

variable "ssh_user" {
  description = "Login user of the AMI (ubuntu for Ubuntu AMIs); written to the outputs for the Ansible inventory."
  type        = string
  default     = "ubuntu"
}

# The node layout (three pools; labels, taints and capacity per pool are in
# iac/ansible/inventory/group_vars/<group>.yml, see docs/cluster.md):
#   control-plane  1 x control_plane_instance_type, keeps kubeadm's NoSchedule taint
#   system         system_worker_count x system_worker_instance_type, untainted (platform, CPU services)
#   gpu            gpu_worker_count x gpu_worker_instance_type, tainted nvidia.com/gpu=present:NoSchedule

variable "control_plane_instance_type" {
  description = "Instance type of the (CPU) Kubernetes control-plane node (one node; m6i.xlarge = 4 vCPU, 16 GiB). It keeps its NoSchedule taint."
  type        = string
  default     = "m6i.xlarge"
}

variable "system_worker_instance_type" {
  description = "Instance type of the untainted CPU workers (pool \"system\": ArgoCD, Argo, Prometheus, MinIO, Postgres, MLflow, gateway, Ray head, workflow steps). m6i.2xlarge = 8 vCPU, 32 GiB."
  type        = string
  default     = "m6i.2xlarge"

  validation {
    condition     = !can(regex("^(g4dn|g5|g6|g6e|gr6|p3|p4d|p4de|p5)\\.", var.system_worker_instance_type))
    error_message = "system_worker_instance_type must be a CPU instance type; GPU machines belong in gpu_worker_instance_type."
  }
}

variable "system_worker_count" {
  description = "Number of untainted CPU workers (pool \"system\"). At least one: nothing that asks for no GPU can run anywhere else."
  type        = number
  default     = 2

  validation {
    condition     = var.system_worker_count >= 1 && var.system_worker_count <= 32 && floor(var.system_worker_count) == var.system_worker_count
    error_message = "system_worker_count must be a whole number between 1 and 32 (the platform and CPU services need an untainted node)."
  }
}

variable "gpu_worker_instance_type" {
  description = "Instance type of the GPU workers (pool \"gpu\": Triton, Ray workers). g5.2xlarge = 8 vCPU, 32 GiB, 1x NVIDIA A10G 24 GB, time-sliced into 4 nvidia.com/gpu by the GPU operator."
  type        = string
  default     = "g5.2xlarge"

  validation {
    condition     = can(regex("^(g4dn|g5|g6|g6e|gr6|p3|p4d|p4de|p5)\\.", var.gpu_worker_instance_type))
    error_message = "gpu_worker_instance_type must be an NVIDIA GPU family (g4dn, g5, g6, g6e, gr6, p3, p4d, p4de, p5)."
  }
}

variable "gpu_worker_count" {
  description = "Number of GPU workers (Ray training workers and Triton replicas are scheduled on them). 2 x 1 GPU x 4 time slices = 8 nvidia.com/gpu for 4 Tritons + 2 Ray workers."
  type        = number
  default     = 2

  validation {
    condition     = var.gpu_worker_count >= 0 && var.gpu_worker_count <= 32 && floor(var.gpu_worker_count) == var.gpu_worker_count
    error_message = "gpu_worker_count must be a whole number between 0 and 32."
  }
}

################################################################################
# Storage
################################################################################

variable "control_plane_root_volume_gb" {
  description = "Root EBS volume size of the control plane (etcd, images), GiB."
  type        = number
  default     = 80

  validation {
    condition     = var.control_plane_root_volume_gb >= 30
    error_message = "control_plane_root_volume_gb must be at least 30 GiB."
  }
}

variable "system_worker_root_volume_gb" {
  description = "Root EBS volume size of each system worker (OS, platform and project images), GiB."
  type        = number
  default     = 100

  validation {
    condition     = var.system_worker_root_volume_gb >= 40
    error_message = "system_worker_root_volume_gb must be at least 40 GiB."
  }
}

variable "system_worker_data_volume_gb" {
  description = "Extra EBS volume per system worker for MinIO and Postgres data (local-path volumes under /var/lib/cxr-data), GiB. 0 = none. MinIO claims 200 GiB and PostgreSQL 20 GiB on it (k8s/base); local-path does not enforce sizes."
  type        = number
  default     = 300

  validation {
    condition     = var.system_worker_data_volume_gb >= 0
    error_message = "system_worker_data_volume_gb must be 0 or more."
  }
}

variable "gpu_worker_root_volume_gb" {
  description = "Root EBS volume size of each GPU worker (OS, NVIDIA driver, container images such as Triton ~15 GB), GiB."
  type        = number
  default     = 150

  validation {
    condition     = var.gpu_worker_root_volume_gb >= 60
    error_message = "gpu_worker_root_volume_gb must be at least 60 GiB (the Triton and CUDA images alone take ~20 GiB)."
  }
}

variable "gpu_worker_data_volume_gb" {
  description = "Extra EBS volume per GPU worker for datasets and Ray spill (mounted at /var/lib/cxr-data), GiB. 0 = none."
  type        = number
  default     = 200

  validation {
    condition     = var.gpu_worker_data_volume_gb >= 0
    error_message = "gpu_worker_data_volume_gb must be 0 or more."
  }
}

variable "artifact_bucket_name" {
  description = "Name of the S3 bucket for MinIO backups and model artifacts. Empty = AWS picks a unique name starting with \"<name>-artifacts-\"."
  type        = string
  default     = ""

  validation {
    condition     = var.artifact_bucket_name == "" || can(regex("^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$", var.artifact_bucket_name))
    error_message = "artifact_bucket_name must be a valid S3 bucket name (3-63 lowercase letters, digits, '.', '-')."
  }
}

variable "artifact_noncurrent_days" {
  description = "Days a replaced (noncurrent) object version is kept in the artifact bucket before expiry."
  type        = number
  default     = 90
}

variable "flow_log_retention_days" {
  description = "Days VPC flow logs are kept in CloudWatch Logs."
  type        = number
  default     = 365
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
