# Nodes. Software is installed by Ansible (iac/ansible), not by user data, so
# that the same playbooks configure these instances, bare-metal servers or a
# re-imaged node, and so that a change to a node's setup is a reviewed diff
# rather than a replaced instance.

resource "aws_key_pair" "this" {
  key_name   = "${var.name}-nodes"
  public_key = var.ssh_public_key

  tags = local.tags
}

resource "aws_instance" "control_plane" {
  ami                         = var.ami_id
  instance_type               = var.control_plane_instance_type
  subnet_id                   = aws_subnet.public[0].id
  vpc_security_group_ids      = [aws_security_group.nodes.id, aws_security_group.control_plane_admin.id]
  key_name                    = aws_key_pair.this.key_name
  iam_instance_profile        = aws_iam_instance_profile.node.name
  associate_public_ip_address = true
  ebs_optimized               = true
  monitoring                  = true

  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required" # IMDSv2 only
    http_put_response_hop_limit = 1          # pods cannot reach the node's credentials
  }

  root_block_device {
    volume_type           = "gp3"
    volume_size           = var.control_plane_root_volume_gb
    encrypted             = true
    kms_key_id            = aws_kms_key.this.arn
    delete_on_termination = true
  }

  tags = merge(local.tags, {
    Name = "${var.name}-control-plane"
    Role = "control-plane"
  })

  lifecycle {
    # A newer AMI must not silently replace the control plane (and etcd).
    ignore_changes = [ami]
  }
}

# CPU workers without a taint: ArgoCD, Argo Workflows, KubeRay, Prometheus, MinIO, Postgres,
# MLflow, the gateway, the Ray head and every workflow step land here (pool "system").
resource "aws_instance" "system_worker" {
  count = var.system_worker_count

  ami                         = var.ami_id
  instance_type               = var.system_worker_instance_type
  subnet_id                   = aws_subnet.private[count.index % local.az_count].id
  vpc_security_group_ids      = [aws_security_group.nodes.id]
  key_name                    = aws_key_pair.this.key_name
  iam_instance_profile        = aws_iam_instance_profile.node.name
  associate_public_ip_address = false
  ebs_optimized               = true
  monitoring                  = true

  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
  }

  root_block_device {
    volume_type           = "gp3"
    volume_size           = var.system_worker_root_volume_gb
    encrypted             = true
    kms_key_id            = aws_kms_key.this.arn
    delete_on_termination = true
  }

  tags = merge(local.tags, {
    Name = "${var.name}-system-worker-${count.index}"
    Role = "system-worker"
  })

  lifecycle {
    ignore_changes = [ami]
  }
}

resource "aws_ebs_volume" "system_worker_data" {
  count = var.system_worker_data_volume_gb > 0 ? var.system_worker_count : 0

  availability_zone = aws_instance.system_worker[count.index].availability_zone
  size              = var.system_worker_data_volume_gb
  type              = "gp3"
  encrypted         = true
  kms_key_id        = aws_kms_key.this.arn

  tags = merge(local.tags, { Name = "${var.name}-system-worker-${count.index}-data" })
}

resource "aws_volume_attachment" "system_worker_data" {
  count = length(aws_ebs_volume.system_worker_data)

  # MinIO and Postgres volumes (local-path) live on this disk, mounted at /var/lib/cxr-data.
  device_name = "/dev/sdf"
  volume_id   = aws_ebs_volume.system_worker_data[count.index].id
  instance_id = aws_instance.system_worker[count.index].id
}

# GPU workers, tainted nvidia.com/gpu=present:NoSchedule by Ansible: only pods that tolerate
# it and ask for nvidia.com/gpu (Triton, Ray workers) land here (pool "gpu").
resource "aws_instance" "gpu_worker" {
  count = var.gpu_worker_count

  ami                         = var.ami_id
  instance_type               = var.gpu_worker_instance_type
  subnet_id                   = aws_subnet.private[count.index % local.az_count].id
  vpc_security_group_ids      = [aws_security_group.nodes.id]
  key_name                    = aws_key_pair.this.key_name
  iam_instance_profile        = aws_iam_instance_profile.node.name
  associate_public_ip_address = false
  ebs_optimized               = true
  monitoring                  = true

  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
  }

  root_block_device {
    volume_type           = "gp3"
    volume_size           = var.gpu_worker_root_volume_gb
    encrypted             = true
    kms_key_id            = aws_kms_key.this.arn
    delete_on_termination = true
  }

  tags = merge(local.tags, {
    Name = "${var.name}-gpu-worker-${count.index}"
    Role = "gpu-worker"
  })

  lifecycle {
    ignore_changes = [ami]
  }
}

resource "aws_ebs_volume" "gpu_worker_data" {
  count = var.gpu_worker_data_volume_gb > 0 ? var.gpu_worker_count : 0

  availability_zone = aws_instance.gpu_worker[count.index].availability_zone
  size              = var.gpu_worker_data_volume_gb
  type              = "gp3"
  encrypted         = true
  kms_key_id        = aws_kms_key.this.arn

  tags = merge(local.tags, { Name = "${var.name}-gpu-worker-${count.index}-data" })
}

resource "aws_volume_attachment" "gpu_worker_data" {
  count = length(aws_ebs_volume.gpu_worker_data)

  # Shows up as /dev/nvme1n1 on Nitro instances; Ansible finds it by serial.
  device_name = "/dev/sdf"
  volume_id   = aws_ebs_volume.gpu_worker_data[count.index].id
  instance_id = aws_instance.gpu_worker[count.index].id
}
