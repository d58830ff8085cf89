"""Which searched decisions a diffusers pipeline loop can run with S3Scheduler.

Everything a schedule can hold runs inside the loop except:
- ``afs='mean_x0'``: needs the data mean, which no pipeline gives its scheduler (latents have none
  known);
- ``afs='zero_x0'`` in a pipeline that never calls ``scheduler.scale_model_input`` (DDPMPipeline,
  DDIMPipeline, Flux, ...): the first model call would see x_T instead of x_t1;
- any AFS in a pipeline that passes ``scale_model_input``'s output on to ``step`` as the sample
  (DiTPipeline): the first step would start from x_t1 and apply the analytical step twice.
Search targets exclude these and export refuses them, with ``check_expressible``.
"""

from __future__ import annotations

import inspect
from functools import lru_cache

from s3_ray.usf.schedule import ScheduleError, SolverSchedule

# Pipelines whose loop hands the output of scheduler.scale_model_input to scheduler.step as the sample.
SCALED_INPUT_TO_STEP = ("DiTPipeline",)


def mean_x0_refusal(schedule: SolverSchedule) -> str | None:
    """Why the schedule's AFS cannot run in any pipeline (a 'field: reason' text), or None."""
    if schedule.afs == "mean_x0":
        return ("afs: 'mean_x0' (the analytical first step into steps[0]) needs the data mean image, which a "
                "diffusers pipeline does not give its scheduler; use afs 'zero_x0' or 'none'")
    return None


def pipeline_class_name(pipeline) -> str:
    """The class name of a pipeline given as a name, a class or an instance."""
    if isinstance(pipeline, str):
        return pipeline
    return pipeline.__name__ if isinstance(pipeline, type) else type(pipeline).__name__


@lru_cache(maxsize=64)
def _calls_scale_model_input(name: str) -> bool | None:
    import diffusers

    cls = getattr(diffusers, name, None)
    if not isinstance(cls, type):
        return None
    try:
        source = inspect.getsource(cls.__call__)
    except (OSError, TypeError):
        return None
    return "scale_model_input(" in source


def calls_scale_model_input(pipeline) -> bool | None:
    """Whether a diffusers pipeline's loop calls ``scheduler.scale_model_input`` before its model
    calls (read from its ``__call__`` source); None for a class diffusers does not have."""
    if not isinstance(pipeline, str):
        cls = pipeline if isinstance(pipeline, type) else type(pipeline)
        try:
            return "scale_model_input(" in inspect.getsource(cls.__call__)
        except (OSError, TypeError):
            return None
    return _calls_scale_model_input(pipeline)


def check_expressible(schedule: SolverSchedule, pipeline) -> None:
    """Raise ScheduleError (naming the decision and step) if ``pipeline`` (a diffusers pipeline
    class name, class or instance) cannot run ``schedule`` exactly with S3Scheduler."""
    reason = mean_x0_refusal(schedule)
    if reason:
        raise ScheduleError(reason)
    if schedule.nfe() < 1:
        raise ScheduleError("afs: the schedule makes no model call (NFE 0); a pipeline loop needs at least one")
    if schedule.afs != "none":
        name = pipeline_class_name(pipeline)
        if name in SCALED_INPUT_TO_STEP:
            raise ScheduleError(
                f"afs: {schedule.afs!r} (the analytical first step into steps[0]) cannot run in {name}: its loop "
                "passes scale_model_input's output to step as the sample, so the first step would be applied "
                f"twice; search {name} with afs 'none'")
        calls = calls_scale_model_input(pipeline)
        if not calls:
            why = ("does not call scheduler.scale_model_input" if calls is False
                   else "is not a diffusers pipeline class this check can read")
            raise ScheduleError(
                f"afs: {schedule.afs!r} (the analytical first step into steps[0]) needs the first model call to "
                f"see x_t1, but {name} {why}, so it would see x_T; search {name} with afs 'none'")
