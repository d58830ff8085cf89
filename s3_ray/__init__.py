"""s3-ray: solver-schedule search for diffusion models (USF / S3) on Ray, tracked in MLflow."""

__all__ = ["S3Scheduler"]


def __getattr__(name):
    # Lazy: ``import s3_ray`` does not import diffusers; ``from s3_ray import S3Scheduler`` does.
    if name == "S3Scheduler":
        from s3_ray.pipelines.scheduler import S3Scheduler

        return S3Scheduler
    if name == "SchedulerMixin":
        # A pipeline folder naming ["s3_ray", "S3Scheduler"]: diffusers' loader picks the load method
        # by looking up the base classes it knows (SchedulerMixin, ModelMixin, ...) on the library
        # module, as diffusers and transformers export theirs.
        from diffusers import SchedulerMixin

        return SchedulerMixin
    raise AttributeError(f"module 's3_ray' has no attribute {name!r}")
