"""diffusers integration: S3Scheduler runs searched schedules inside pipelines (imports diffusers
lazily: ``check_expressible`` does not need it)."""

from .expressible import calls_scale_model_input, check_expressible

__all__ = ["S3Scheduler", "calls_scale_model_input", "check_expressible"]


def __getattr__(name):
    if name == "S3Scheduler":
        from .scheduler import S3Scheduler

        return S3Scheduler
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
