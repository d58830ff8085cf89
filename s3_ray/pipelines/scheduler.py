"""S3Scheduler: a diffusers scheduler that runs searched USF schedules exactly inside a pipeline loop.

The scheduler holds one compiled ``SamplerPlan`` per NFE and drives it through a ``PlanRun``, the
same state machine ``SamplerPlan.run`` uses, so a pipeline and our sampler run the same updates
(see shared/docs/DIFFUSERS.md). One model call per entry of ``timesteps``; ``step`` converts the
network output to eps, hands it to the run and returns the next model input (or the final sample).

Differences from our sampler's conventions, all inherited from diffusers:
- ``init_noise_sigma`` is 1: pipelines start from unit-variance noise at t_start (our sampler is
  given whatever x_T the caller scales; sigma_T of vp_discrete is 0.99998, of flow 0.999).
- the stock schedulers' x0 clipping / thresholding options of the source config are not applied.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin
from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput

from s3_ray.models.adapter import output_for_prediction_type, to_eps
from s3_ray.usf.noise import NoiseSchedule, noise_from_diffusers_config
from s3_ray.usf.sampler import PlanRun, SamplerPlan
from s3_ray.usf.schedule import ScheduleError, SolverSchedule

from .expressible import mean_x0_refusal

# config fields (scheduler_config.json); the noise schedule is rebuilt from the first group
NOISE_FIELDS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                "prediction_type", "shift")
FIELDS = (*NOISE_FIELDS, "source_scheduler", "schedules")
VP_SOURCE, FLOW_SOURCE = "DDPMScheduler", "FlowMatchEulerDiscreteScheduler"
LABEL_TOL = 1e-3  # relative: a timestep passed to step() is the label of its position


class _Compiled:
    """One schedule, ready for the pipeline loop: the plan, the time label of each model call and
    alpha, sigma there (float64 scalars, as ModelAdapter computes them)."""

    def __init__(self, schedule: SolverSchedule, noise: NoiseSchedule):
        self.plan = SamplerPlan(schedule, noise)
        times = [self.plan.times[j] for j in self.plan.eval_entries]
        self.alphas = [float(noise.alpha(t)) for t in times]
        self.sigmas = [float(noise.sigma(t)) for t in times]
        labels = [float(noise.time_label(t)) for t in times]
        rounded = [round(v) for v in labels]
        self.integer = all(abs(v - r) <= 1e-9 for v, r in zip(labels, rounded))
        self.labels = [float(r) for r in rounded] if self.integer else labels

    def timesteps(self, device) -> torch.Tensor:
        if self.integer:
            return torch.tensor([int(v) for v in self.labels], dtype=torch.int64, device=device)
        return torch.tensor(self.labels, dtype=torch.float32, device=device)


def _as_schedule(k: int, s) -> SolverSchedule:
    if isinstance(s, SolverSchedule):
        return s
    try:
        if isinstance(s, (str, bytes)):
            return SolverSchedule.from_json(s)
        if isinstance(s, dict):
            return SolverSchedule.from_dict(s)
    except ScheduleError as e:
        raise ScheduleError(f"schedules[{k}]: {e}") from None
    raise ScheduleError(f"schedules[{k}]: a schedule is a SolverSchedule or its JSON text, got {type(s).__name__}")


class S3Scheduler(SchedulerMixin, ConfigMixin):
    """Runs searched USF schedules (one per NFE) inside any diffusers pipeline loop.

    Build it from a pipeline's own scheduler, so the noise schedule and output type are the
    model's: ``pipe.scheduler = S3Scheduler.from_config(pipe.scheduler.config, schedules=[...])``;
    then ``pipe(..., num_inference_steps=nfe)`` runs the schedule with that NFE.
    ``save_pretrained`` / ``from_pretrained`` restore it exactly (schedules as canonical JSON).
    """

    order = 1
    _compatibles: list = []

    def __init__(self, schedules=(), num_train_timesteps: int = 1000, beta_start: float = 0.0001,
                 beta_end: float = 0.02, beta_schedule: str = "linear", trained_betas=None,
                 prediction_type: str = "epsilon", shift: float = 1.0, source_scheduler: str = VP_SOURCE):
        if not isinstance(source_scheduler, str) or not source_scheduler or source_scheduler == type(self).__name__:
            raise ValueError(f"source_scheduler: the diffusers scheduler class the noise schedule comes from "
                             f"(e.g. {VP_SOURCE!r}), got {source_scheduler!r}")
        if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not (math.isfinite(shift) and shift > 0):
            raise ValueError(f"shift: a finite positive number, got {shift!r}")
        flow = source_scheduler.startswith("FlowMatch")
        noise_cfg = {"_class_name": source_scheduler, "num_train_timesteps": num_train_timesteps}
        if flow:
            noise_cfg["shift"] = shift
        else:
            noise_cfg.update(beta_start=beta_start, beta_end=beta_end, beta_schedule=beta_schedule,
                             trained_betas=None if trained_betas is None else list(trained_betas))
        self.noise: NoiseSchedule = noise_from_diffusers_config(noise_cfg)
        self.output: str = output_for_prediction_type(prediction_type, source_scheduler)

        if isinstance(schedules, (str, bytes, dict, SolverSchedule)) or not hasattr(schedules, "__iter__"):
            raise ScheduleError("schedules: a list of schedules (SolverSchedule or JSON text), one per NFE")
        parsed = [_as_schedule(k, s) for k, s in enumerate(schedules)]
        by_nfe: dict[int, tuple[int, _Compiled]] = {}
        for k, s in enumerate(parsed):
            where = f"schedules[{k}]"
            if s.noise_schedule != self.noise.name:
                raise ScheduleError(f"{where}.noise_schedule: the schedule is for {s.noise_schedule!r}, this "
                                    f"scheduler's model uses {self.noise.name!r} (from {source_scheduler})")
            for reason in (mean_x0_refusal(s), _nfe_refusal(s)):
                if reason:
                    raise ScheduleError(f"{where}.{reason}")
            t_min = self.noise.t_min
            for i, st in enumerate(s.steps):
                if st.t < t_min:
                    raise ScheduleError(f"{where}.steps[{i}].t: {st.t!r} is below {t_min!r}, the first training "
                                        f"step of this {self.noise.name} schedule")
            n = s.nfe()
            if n in by_nfe:
                raise ScheduleError(f"{where}: NFE {n} is already held by schedules[{by_nfe[n][0]}] "
                                    "(at most one schedule per NFE)")
            try:
                by_nfe[n] = (k, _Compiled(s, self.noise))
            except ScheduleError as e:
                raise ScheduleError(f"{where}.{e}") from None
        self._compiled = {n: c for n, (_, c) in sorted(by_nfe.items())}
        canonical = [c.plan.schedule.to_json() for c in self._compiled.values()]

        self.register_to_config(
            num_train_timesteps=num_train_timesteps, beta_start=float(beta_start), beta_end=float(beta_end),
            beta_schedule=beta_schedule, trained_betas=None if trained_betas is None else [float(b) for b in trained_betas],
            prediction_type=prediction_type, shift=float(shift), source_scheduler=source_scheduler,
            schedules=canonical)
        self.init_noise_sigma = 1.0
        self.timesteps: torch.Tensor | None = None
        self.num_inference_steps: int | None = None
        self._reset(None)

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_config(cls, config=None, return_unused_kwargs: bool = False, **kwargs):
        """From any diffusers scheduler's config (its noise schedule and prediction type) or an
        S3Scheduler's; keyword arguments (``schedules=[...]``) override fields."""
        if not isinstance(config, dict):  # FrozenDict is a dict
            raise TypeError("S3Scheduler.from_config takes a scheduler config (e.g. pipe.scheduler.config); "
                            "load a folder with S3Scheduler.from_pretrained")
        unknown = sorted(set(kwargs) - set(FIELDS))
        if unknown:
            raise TypeError(f"S3Scheduler.from_config: unknown argument(s) {', '.join(unknown)} "
                            f"(fields: {', '.join(FIELDS)})")
        cfg = {k: v for k, v in dict(config).items() if k != "_use_default_values"}
        if cfg.get("_class_name") == cls.__name__ or "source_scheduler" in cfg:
            init = {k: cfg[k] for k in FIELDS if k in cfg}
        else:
            # A stock scheduler: every value it holds (defaults included) describes its model.
            noise = noise_from_diffusers_config(cfg)
            source = cfg.get("_class_name") or (FLOW_SOURCE if noise.name == "flow" else VP_SOURCE)
            if noise.name == "flow":
                init = {"num_train_timesteps": cfg.get("num_train_timesteps", 1000), "shift": cfg.get("shift", 1.0),
                        "prediction_type": cfg.get("prediction_type", "flow_prediction")}
            else:
                init = {k: cfg[k] for k in NOISE_FIELDS if k in cfg and k != "shift"}
            init["source_scheduler"] = source
        init.update(kwargs)
        sched = cls(**init)
        if return_unused_kwargs:
            return sched, {k: v for k, v in cfg.items() if k not in init and not k.startswith("_")}
        return sched

    # ---- the pipeline loop --------------------------------------------------------------
    @property
    def nfes(self) -> tuple[int, ...]:
        """The NFEs this scheduler holds a schedule for (ascending)."""
        return tuple(self._compiled)

    def schedule_for(self, nfe: int) -> SolverSchedule:
        """The held schedule with ``nfe`` model calls (ValueError listing the held NFEs)."""
        return self._get(nfe).plan.schedule

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      timesteps=None, sigmas=None, mu: float | None = None):
        """Select the schedule whose NFE is ``num_inference_steps``; ``timesteps`` become the
        denoiser's time labels at its evaluation points. ``mu`` (dynamic shifting) is ignored:
        the schedule fixes its own times, so custom ``timesteps``/``sigmas`` are refused."""
        if timesteps is not None or sigmas is not None:
            raise ValueError(f"S3Scheduler: custom {'timesteps' if timesteps is not None else 'sigmas'} cannot be "
                             f"used: a searched schedule fixes its own evaluation times; pass num_inference_steps "
                             f"(held NFEs: {self._held()})")
        c = self._get(num_inference_steps)
        self.num_inference_steps = int(num_inference_steps)
        self.timesteps = c.timesteps(device)
        self._reset(c)

    def _get(self, nfe) -> _Compiled:
        if isinstance(nfe, bool) or not isinstance(nfe, (int, np.integer)) or int(nfe) not in self._compiled:
            raise ValueError(f"S3Scheduler holds no schedule for num_inference_steps={nfe!r}; "
                             f"held NFEs: {self._held()}")
        return self._compiled[int(nfe)]

    def _held(self) -> str:
        return ", ".join(map(str, self._compiled)) or "none (build it with schedules=[...])"

    def _reset(self, c: _Compiled | None):
        self._current = c
        self._step_index = 0
        self._run: PlanRun | None = None
        self._returned: torch.Tensor | None = None
        self._afs_mapped = False

    @property
    def step_index(self) -> int | None:
        """Model calls already consumed by step() in this run (None before set_timesteps)."""
        return None if self._current is None else self._step_index

    @property
    def begin_index(self) -> int:
        return 0

    def set_begin_index(self, begin_index: int = 0):
        """Only 0: img2img/inpainting with strength < 1 would run the tail of the schedule only."""
        if begin_index != 0:
            raise ValueError(f"S3Scheduler cannot start at step {begin_index}: a searched schedule cannot be "
                             "truncated (img2img/inpainting with strength < 1 would run only part of it); "
                             "use strength=1.0, or a stock scheduler for partial denoising")

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """Identity, except before the first call of an AFS schedule: there the model must see
        x_{t1}, the analytical first step from x_T (affine elementwise, so ``sample`` may be the
        CFG-doubled batch); step() replays it."""
        c = self._current
        if c is None or self._step_index != 0 or c.plan.schedule.afs == "none":
            return sample
        self._afs_mapped = True
        return c.plan.start(sample).first_input()

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True,
             generator=None) -> SchedulerOutput | tuple:
        """Take the model output at the current evaluation point; return the next model input (the
        final sample after the last call). ``generator`` is unused (the schedules are ODE solvers)."""
        c = self._current
        if c is None:
            raise RuntimeError("S3Scheduler.step: call set_timesteps(num_inference_steps) first")
        k = self._step_index
        n = len(c.labels)
        if k >= n:
            raise RuntimeError(f"S3Scheduler.step: called {k + 1} times, but the schedule makes {n} model calls; "
                               "call set_timesteps before each run")
        self._check_timestep(k, timestep)
        if k == 0:
            afs = c.plan.schedule.afs
            if afs != "none" and not self._afs_mapped:
                raise ValueError(f"afs={afs!r}: the first model call must see x_t1 (the analytical first step), "
                                 "but the pipeline did not call scheduler.scale_model_input before it, so the model "
                                 "saw x_T; this pipeline cannot run AFS schedules (search it with afs='none')")
            self._run = c.plan.start(sample)
            self._run.first_input()
        elif sample is not self._returned and not (
                sample.shape == self._returned.shape and torch.equal(sample, self._returned)):
            raise ValueError(f"S3Scheduler.step {k}: `sample` is not the latents returned by the previous step; "
                             "a searched schedule keeps its own history, so latents changed between steps "
                             "(e.g. by callback_on_step_end) cannot be followed")
        run = self._run
        eps = model_output
        if self.output != "eps":
            eps = to_eps(self.output, model_output, run.pending_input, c.alphas[k], c.sigmas[k])
        out = run.advance(eps)
        self._step_index = k + 1
        self._returned = out
        if run.done != (k + 1 == n):  # the plan and its call list disagree: never return a wrong state
            raise RuntimeError(f"S3Scheduler: internal error, run done={run.done} after call {k + 1} of {n}")
        if not return_dict:
            return (out,)
        return SchedulerOutput(prev_sample=out)

    def _check_timestep(self, k: int, timestep):
        """A timestep other than the label at this position means the loop skipped part of the
        schedule (e.g. img2img without set_begin_index). Checked on CPU (and always at the first
        call, one device sync per run)."""
        if timestep is None:
            return
        if isinstance(timestep, torch.Tensor):
            if timestep.device.type != "cpu" and k > 0:
                return
            got = float(timestep if timestep.ndim == 0 else timestep.reshape(-1)[0])
        else:
            got = float(timestep)
        want = self._current.labels[k]
        if abs(got - want) > LABEL_TOL * max(1.0, abs(want)):
            raise ValueError(f"S3Scheduler.step {k}: timestep {got:g} is not timesteps[{k}] = {want:g}; "
                             "a searched schedule runs from its first timestep in order and cannot be truncated")

    # ---- forward process ---------------------------------------------------------------
    def _t_of_labels(self, timesteps) -> np.ndarray:
        labels = torch.as_tensor(timesteps).detach().to("cpu", torch.float64).reshape(-1).numpy()
        if self.noise.name == "flow":
            return labels / self.noise.num_train_timesteps
        return (labels + 1.0) / self.noise.N

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """x_t = alpha_t x0 + sigma_t eps at the time of each label (flow: (1 - sigma) x0 + sigma eps)."""
        t = self._t_of_labels(timesteps)
        shape = (-1,) + (1,) * (original_samples.ndim - 1) if t.size > 1 else ()
        kw = {"dtype": original_samples.dtype, "device": original_samples.device}
        alpha = torch.as_tensor(self.noise.alpha(t), **kw).reshape(shape)
        sigma = torch.as_tensor(self.noise.sigma(t), **kw).reshape(shape)
        return alpha * original_samples + sigma * noise

    def scale_noise(self, sample: torch.Tensor, timestep, noise: torch.Tensor) -> torch.Tensor:
        """Flow pipelines' name for add_noise (FlowMatchEulerDiscreteScheduler.scale_noise)."""
        return self.add_noise(sample, noise, timestep)

    def __len__(self) -> int:
        return self.config.num_train_timesteps


def _nfe_refusal(s: SolverSchedule) -> str | None:
    if s.nfe() < 1:
        return "afs: this schedule makes no model call (NFE 0); a pipeline loop needs at least one"
    return None


# diffusers' save_pretrained records a component's library from its class's module and loading
# resolves it from sys.modules: with the public home, model_index.json names ["s3_ray", "S3Scheduler"]
# and ``import s3_ray`` is all a loader needs (s3_ray.S3Scheduler is a lazy attribute).
S3Scheduler.__module__ = "s3_ray"
