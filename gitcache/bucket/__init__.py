"""The S3 bucket replicas share: client, failures, conditional writes, multipart uploads, leases."""
