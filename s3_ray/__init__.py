"""s3-ray: solver-schedule search for diffusion models (USF / S3) on Ray, tracked in MLflow."""
