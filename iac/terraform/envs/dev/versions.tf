terraform {
  required_version = ">= 1.5"

  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = "~> 5.100"
    }
  }

  # Remote state: S3 with a DynamoDB lock table, configured at init time so no
  # account-specific name lives in git:
  #   terraform init -backend-config=backend.hcl   (see backend.hcl.example)
  # Tests and offline checks run `terraform init -backend=false`.
  backend "s3" {}
}
