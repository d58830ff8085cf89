"""Search-space configuration (search_spaces/*.yaml), validated by pydantic.

Errors name the field (``operators.order_probs: ...``). Defaults are the public release's values
(USF spec section 4.2) where the spec gives one.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)


class ConfigError(ValueError):
    """A malformed configuration; the message names the field."""


class _Cfg(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_probs(v: dict, what: str) -> dict:
    if not v or any(p < 0 or not math.isfinite(p) for p in v.values()) or sum(v.values()) <= 0:
        raise ValueError(f"{what} must be non-negative and not all zero")
    return v


class OperatorConfig(_Cfg):
    """Evolutionary operators (spec 4.2)."""

    top_k: int = Field(default=15, ge=1, description="parents are drawn uniformly from the top-k at the target NFE")
    crossover_prob: float = Field(default=0.3, ge=0, le=1)
    deep_crossover_prob: float = Field(default=0.5, ge=0, le=1)
    step_mutation_prob: float = Field(default=0.3, ge=0, le=1, description="per step, for each mutation kind")
    timestep_sigma: float = Field(default=0.08, ge=0, description="relative log-normal move of the step size in lambda")
    order_probs: dict[int, float] = {1: 0.2, 2: 0.4, 3: 0.3, 4: 0.1}
    first_derivative_points: tuple[int, ...] = (1, 2)
    relaxation_sd: float = Field(default=0.03, ge=0)
    corrector_probs: dict[str, float] = {"none": 0.5, "pseudo": 0.5}
    afs_prob: float = Field(default=0.3, ge=0, le=1)
    add_step_prob: float = Field(default=0.2, ge=0, le=1)
    delete_step_prob: float = Field(default=0.2, ge=0, le=1)

    @field_validator("order_probs")
    @classmethod
    def _orders(cls, v):
        if any(k not in (1, 2, 3, 4) for k in v):
            raise ValueError(f"orders must be 1..4, got {sorted(v)}")
        return _check_probs(v, "order probabilities")

    @field_validator("corrector_probs")
    @classmethod
    def _correctors(cls, v):
        if any(k not in ("none", "pseudo", "implicit") for k in v):
            raise ValueError(f"correctors are none, pseudo, implicit; got {sorted(v)}")
        return _check_probs(v, "corrector probabilities")

    @field_validator("first_derivative_points")
    @classmethod
    def _k1(cls, v):
        if not v or any(k < 1 or k > 3 for k in v):
            raise ValueError("first-derivative point counts must be in 1..3")
        return v


class DecisionSpace(_Cfg):
    """Which decisions the search may take."""

    # "dpmsolver_v3" needs the model's EMS (computed once per model, usf/ems.py): opt in per space
    predictions: tuple[Literal["noise", "data", "dpmsolver_v3"], ...] = ("noise", "data")
    max_order: int = Field(default=3, ge=1, le=4)
    correctors: tuple[Literal["none", "pseudo", "implicit"], ...] = ("none", "pseudo")
    afs: tuple[Literal["none", "zero_x0", "mean_x0"], ...] = ("none", "zero_x0", "mean_x0")
    t_end_range: tuple[float, float] | None = Field(default=None, description="final time range; default: the noise schedule's t_end")
    min_dlambda: float = Field(default=0.05, gt=0, description="smallest step in logSNR")
    max_steps: int = Field(default=12, ge=1, le=64)

    @field_validator("predictions", "correctors", "afs")
    @classmethod
    def _nonempty(cls, v):
        if not v:
            raise ValueError("must allow at least one value")
        return v

    @field_validator("t_end_range")
    @classmethod
    def _range(cls, v):
        if v is not None and not (0 < v[0] <= v[1]):
            raise ValueError(f"need 0 < low <= high, got {list(v)}")
        return v


PIPELINE_FIELDS = ("pipeline", "prompts", "class_labels", "negative_prompt", "guidance_scale", "image_size",
                   "metric_space", "batch_size")
ADAPTER_FIELDS = ("checkpoint", "output", "time_label", "image_shape")


class ModelConfig(_Cfg):
    """The diffusion model under search. ``digits`` is the embedded default; ``digits_cfg`` its
    class-conditional sibling sampled with classifier-free guidance (``guidance_scale``); ``checkpoint`` loads a
    user network (safetensors) through a model adapter; ``diffusers_pipeline`` samples with a user's
    diffusers pipeline folder through ``S3Scheduler`` (s3_ray/models/pipeline.py)."""

    kind: Literal["digits", "digits_cfg", "checkpoint", "gmm", "diffusers_pipeline"] = "digits"
    noise_schedule: str | None = Field(default=None, description=(
        "default vp_linear; for a pipeline: omit it (the pipeline's scheduler_config.json gives it) or name the "
        "same schedule"))
    checkpoint: str | None = None
    output: Literal["eps", "x0", "v", "score", "flow"] = "eps"
    time_label: str = "t"
    image_shape: tuple[int, ...] | None = None
    # ---- kind: diffusers_pipeline ----
    pipeline: str | None = Field(default=None, description="a diffusers pipeline folder (model_index.json, safetensors)")
    prompts: str | None = Field(default=None, description="a UTF-8 text file, one prompt per line (text-conditional)")
    class_labels: tuple[int, ...] | None = Field(default=None, description="class ids (class-conditional pipelines)")
    negative_prompt: str | None = Field(default=None, max_length=2000)
    guidance_scale: float = Field(default=1.0, ge=1.0, description="classifier-free guidance; 1 = none")
    image_size: tuple[int, int] | None = Field(default=None, description=(
        "[H, W] of the images; default: the denoiser's sample_size x the VAE scale factor"))
    metric_space: Literal["latent", "image"] = Field(default="latent", description=(
        "RMSE on the final latents or on the decoded images"))
    batch_size: int = Field(default=16, ge=1, le=4096, description="samples per pipeline call (CFG doubles it)")

    @model_validator(mode="before")
    @classmethod
    def _default_noise(cls, data):
        if isinstance(data, dict) and data.get("kind") != "diffusers_pipeline" and data.get("noise_schedule") is None:
            data = {**data, "noise_schedule": "vp_linear"}
        return data

    @field_validator("guidance_scale")
    @classmethod
    def _finite(cls, v):
        if not math.isfinite(v):
            raise ValueError(f"must be finite, got {v}")
        return v

    @field_validator("class_labels")
    @classmethod
    def _labels(cls, v):
        if v is not None and (not v or any(k < 0 for k in v) or len(v) > 100_000):
            raise ValueError("need 1..100000 class ids, each >= 0")
        return v

    @field_validator("image_size")
    @classmethod
    def _size(cls, v):
        if v is not None and not all(1 <= k <= 16384 for k in v):
            raise ValueError(f"height and width must be in 1..16384, got {list(v)}")
        return v

    @model_validator(mode="after")
    def _kind_fields(self):
        changed = {f for f in (*PIPELINE_FIELDS, *ADAPTER_FIELDS)
                   if getattr(self, f) != type(self).model_fields[f].default}
        if self.kind == "checkpoint" and not self.checkpoint:
            raise ValueError("checkpoint: required when kind is 'checkpoint'")
        if self.kind == "diffusers_pipeline":
            if not self.pipeline:
                raise ValueError("pipeline: required when kind is 'diffusers_pipeline' (a diffusers pipeline folder)")
            if self.prompts is not None and self.class_labels is not None:
                raise ValueError("prompts: give prompts or class_labels, not both")
            for f in ADAPTER_FIELDS:
                if f in changed:
                    raise ValueError(f"{f}: not used with kind 'diffusers_pipeline' (the pipeline folder and its "
                                     "scheduler config give the network, its output and time labels)")
            if self.negative_prompt is not None and self.guidance_scale == 1.0:
                raise ValueError("negative_prompt: only used with classifier-free guidance (guidance_scale > 1)")
        else:
            for f in PIPELINE_FIELDS:
                if f in changed and not (f == "guidance_scale" and self.kind == "digits_cfg"):
                    raise ValueError(f"{f}: only used with kind 'diffusers_pipeline'"
                                     + (" or 'digits_cfg'" if f == "guidance_scale" else ""))
        return self

    @model_serializer(mode="wrap")
    def _dump(self, handler):
        # Only the fields of this kind: configs (and the hashes and caches keyed by them) of the other
        # kinds read as before the pipeline fields existed.
        drop = ADAPTER_FIELDS if self.kind == "diffusers_pipeline" else PIPELINE_FIELDS
        keep = ("guidance_scale",) if self.kind == "digits_cfg" else ()
        return {k: v for k, v in handler(self).items() if k not in drop or k in keep}


class MetricConfig(_Cfg):
    """How a schedule is scored. ``samples`` is per stage (later stages use more)."""

    kind: Literal["fid", "rmse"] = "fid"
    reference: Literal["data", "model"] = "data"
    samples: tuple[int, ...] = (1000,)
    final_samples: int = Field(default=2000, ge=2)
    final_seeds: int = Field(default=2, ge=1, description="fresh seeds for the final re-evaluation")
    reference_samples: int = Field(default=2000, ge=2, description="size of the 'model' reference set")
    feature_extractor: str = "s3-digits"
    feature_extractor_weights_path: str | None = None
    worst_score: float = Field(default=1e4, gt=0, description="score of a schedule that produced NaN/Inf")

    @field_validator("samples")
    @classmethod
    def _samples(cls, v):
        if not v or any(n < 2 for n in v):
            raise ValueError("each stage needs at least 2 samples")
        return v

    @model_validator(mode="after")
    def _inception(self):
        if self.feature_extractor.startswith("inception") and not self.feature_extractor_weights_path:
            raise ValueError("feature_extractor_weights_path: required for Inception (no downloads at run time)")
        return self


class PredictorConfig(_Cfg):
    model: Literal["net", "forest"] = Field(default="net", description=(
        "'net': the deep-sets network trained on pairwise rankings; 'forest': a random forest regressing "
        "the log score on the same encodings (its trees' spread is the uncertainty for 'ucb')"))
    hidden: tuple[int, ...] = (64, 64)
    epochs: int = Field(default=300, ge=1)
    refit_epochs: int | None = Field(default=None, ge=1, description=(
        "incremental fits: each stage after the first starts from the previous stage's predictor (its "
        "weights and input scaling) and trains this many epochs on its own training set, instead of "
        "`epochs` from scratch (None: every stage from scratch)"))
    lr: float = Field(default=3e-3, gt=0)
    candidates: int = Field(default=400, ge=1, description="evolutionary mutants scored by the predictor per stage")
    max_steps: int = Field(default=16, ge=1, description="encoding pads schedules to this many steps")
    probes: bool = Field(default=True, description="add each schedule's errors on analytic probe problems to its encoding")
    weight_decay: float = Field(default=0.03, ge=0)
    max_train: int = Field(default=1000, ge=2, description=(
        "results one stage trains on at most (beyond: per NFE the best quarter and a seeded sample of the "
        "rest), so planning costs no more at 10,000 results than at this many"))
    ensemble: int = Field(default=1, ge=1, le=32, description=(
        "predictors per stage, each from its own seed on a bootstrap resample of the training set (1: one "
        "predictor on all of it)"))
    acquisition: Literal["mean", "ucb"] = Field(default="mean", description=(
        "how candidates are ranked: 'mean' of the members' standardised predictions, or 'ucb': mean - kappa x "
        "their spread (optimistic, for a minimised score; needs ensemble >= 2, or model forest: its trees)"))
    kappa: float = Field(default=1.0, ge=0, description="weight of the members' spread under acquisition 'ucb'")
    trees: int = Field(default=300, ge=2, le=5000, description="trees of model 'forest'")
    min_leaf: int = Field(default=2, ge=1, description="fewest training schedules in a leaf of model 'forest'")

    @model_validator(mode="after")
    def _acquisition(self):
        if self.model == "forest":
            if self.ensemble != 1:
                raise ValueError("ensemble: model 'forest' is an ensemble of its trees already: leave ensemble at 1")
            if self.refit_epochs is not None:
                raise ValueError("refit_epochs: incremental fits are for model 'net' (a forest refits in ~1 s)")
        elif self.acquisition == "ucb" and self.ensemble < 2:
            raise ValueError("acquisition: 'ucb' needs the members' spread: set predictor.ensemble >= 2 "
                             "(or predictor.model: forest)")
        return self


class ResourcesConfig(_Cfg):
    cpu: float = Field(default=1.0, gt=0)
    gpu: float = Field(default=0.0, ge=0)


class SyntheticConfig(_Cfg):
    """A benchmark tool, not a search: each trial scores its schedule on the configured (cheap,
    ``gmm``) model, then sleeps until a duration drawn from a lognormal with a straggler tail has
    passed, so the real searcher, Tune and MLflow run at high concurrency while trials cost no CPU.
    The duration is a function of the trial key and the seed (the same in a simulation)."""

    median_s: float = Field(default=2.0, gt=0, description="median trial duration (seconds)")
    sigma: float = Field(default=0.25, ge=0, description="lognormal shape of the duration")
    straggler_prob: float = Field(default=0.02, ge=0, le=1, description="chance a trial is a straggler")
    straggler_factor: float = Field(default=5.0, ge=1, description="a straggler lasts this many times longer")


class ScreenConfig(_Cfg):
    """Multi-fidelity stages (successive halving with one cheap rung): each S3 stage sends
    ``factor`` x as many predicted-best mutants to a cheap fidelity, and only the best 1 / ``factor``
    of them per NFE to the full metric. ``fidelity``: ``rmse``, the RMSE of ``samples`` few-step
    samples against the converged solve from the same noise (common random numbers: nearly
    noise-free), or ``metric``, the search's own metric on ``samples`` samples."""

    samples: int = Field(default=64, ge=2, le=4096, description="samples per screened schedule")
    factor: int = Field(default=3, ge=2, le=100, description="schedules screened per full evaluation")
    cost: float = Field(default=0.05, gt=0, le=1, description=(
        "budget charged per screened schedule, in full evaluations (its time relative to one full "
        "evaluation: benchmarks/results/fidelity.md)"))
    batch: int = Field(default=16, ge=1, le=1024, description="schedules screened per trial")
    fidelity: Literal["rmse", "metric"] = Field(default="rmse", description=(
        "rmse: against the converged solve from the same noise; metric: the search metric (e.g. FID) on "
        "`samples` samples, which ranks a stage's proposals far better (README: search efficiency)"))


class SearchConfig(_Cfg):
    """A whole search: search_spaces/*.yaml."""

    name: str = Field(default="search", description="run directory <runs>/<name>/ and MLflow experiment")
    model: ModelConfig = ModelConfig()
    metric: MetricConfig = MetricConfig()
    nfe: tuple[int, ...] = Field(default=(5,), description="NFE values searched jointly")
    budget: int = Field(default=100, ge=1, description=(
        "true evaluations in total (with screen: in full-evaluation cost, a screened schedule charged screen.cost)"))
    stages: int = Field(default=3, ge=1)
    plan_ahead: int = Field(default=0, ge=0, description=(
        "0: a stage is planned once every earlier result is in (workers wait meanwhile); k > 0: it is "
        "planned in the background as soon as all but the previous phase's last k results are in "
        "(a stage's first one at least, half the seed phase at least), and those k count from the stage "
        "after; the seed phase then holds at least 2 x concurrency schedules (random ones fill it). "
        "k >= a stage's size: asynchronous stages (each trains on every result before the previous stage)"))
    plan_lag: int = Field(default=0, ge=0, description=(
        "asynchronous stages (plan_ahead >= a stage's size): the next stage trains on every result "
        "suggested before the current stage except the last plan_lag ones (at least one more than the "
        "current stage trained on), and the first stage on half the seed phase less plan_lag / 2 (at "
        "least concurrency; the seed phase then holds 2 x concurrency + plan_lag), so that stragglers "
        "do not hold a stage's planning up (benchmarks/results/scale_sim.md)"))
    plan_chunk: int = Field(default=256, ge=1, description=(
        "proposals per planning chunk: a larger stage is planned in chunks (own seed, a share of the "
        "candidates), queued in chunk order as each is ready, so workers start on its first chunk"))
    plan_workers: int = Field(default=1, ge=1, le=64, description=(
        "processes that plan a stage's chunks in parallel (1: the planning thread); a head with spare "
        "cores planning for hundreds of workers needs several (benchmarks/results/scale_sim*.md)"))
    random_init: int = Field(default=10, ge=0, description="random schedules per NFE before the first stage")
    operators: OperatorConfig = OperatorConfig()
    decisions: DecisionSpace = DecisionSpace()
    predictor: PredictorConfig = PredictorConfig()
    resources: ResourcesConfig = ResourcesConfig()
    concurrency: int = Field(default=2, ge=1)
    screen: ScreenConfig | None = Field(default=None, description=(
        "multi-fidelity stages (algo s3): screen factor x the stage's proposals at a cheap RMSE "
        "fidelity, fully evaluate the best"))
    synthetic: SyntheticConfig | None = Field(default=None, description=(
        "benchmark tool: trials sleep for a drawn duration and return the gmm model's score "
        "(benchmarks/scale.py); needs model.kind gmm"))
    seed: int = 0
    final_top_k: int = Field(default=3, ge=1, description="schedules per NFE re-evaluated at the end")
    seed_schedules: tuple[str, ...] = Field(default=(), description="schedule JSON files evaluated first (source 'user')")
    warm_start: tuple[str, ...] = Field(default=(), description=(
        "earlier searches of the same model, metric and seed: run directories (runs/<name>) or MLflow "
        "experiments (<tracking URI>#<experiment name>, or a link from the MLflow UI: "
        "http://host:port/#/experiments/<id>[/runs/<parent run id>]); their results enter the pool as "
        "evaluated (source 'warm'), cost no budget and are not evaluated again"))
    warm_split: int = Field(default=3, ge=0, le=50, description=(
        "across NFEs: per NFE k+1 of the range, the warm_start runs' best N schedules at NFE k, each "
        "with its longest logSNR step split in two, join the seed phase (source 'split', from the "
        "budget); 0: off"))
    baselines: tuple[str, ...] = ("ddim", "dpm_solver_pp_2m", "dpm_solver_pp_3m", "unipc_bh2", "dpm_solver_3s")
    discretizations: tuple[str, ...] = ("logsnr_uniform", "time_uniform", "time_quadratic", "edm")

    @field_validator("name")
    @classmethod
    def _name(cls, v):
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}", v):
            raise ValueError(f"{v!r} is not a run name: up to 100 letters, digits, '_', '.', '-', not starting "
                             "with '.' or '-' (it names the directory <runs>/<name>/, so no path and no '..')")
        return v

    @field_validator("nfe")
    @classmethod
    def _nfe(cls, v):
        if not v or any(n < 1 for n in v) or len(set(v)) != len(v):
            raise ValueError(f"distinct positive NFE values required, got {list(v)}")
        return tuple(sorted(v))

    @field_validator("baselines", "discretizations")
    @classmethod
    def _known(cls, v, info):
        from s3_ray.usf.baselines import ALL_DISCRETIZATIONS, BASELINES

        known = BASELINES if info.field_name == "baselines" else ALL_DISCRETIZATIONS
        bad = [b for b in v if b not in known]
        if bad:
            raise ValueError(f"unknown value(s) {bad} (known: {', '.join(known)})")
        return v

    @model_validator(mode="after")
    def _reference(self):
        check_reference(self.model, self.metric)
        if self.synthetic is not None and self.model.kind != "gmm":
            raise ValueError("synthetic: needs model.kind 'gmm' (its score is the cheap objective a synthetic "
                             f"trial returns), got {self.model.kind!r}")
        if self.screen is not None and self.synthetic is not None:
            raise ValueError("screen: not available with synthetic trials (they time one schedule each)")
        if "gits" in self.discretizations and self.model.kind == "diffusers_pipeline":
            raise ValueError("discretizations: 'gits' needs the model as eps(x, t) (its teacher trajectories "
                             "are solved outside the pipeline loop); not available for kind 'diffusers_pipeline'")
        return self


def check_reference(model: ModelConfig, metric: MetricConfig) -> None:
    """FID against 'data' needs the model's training set, which only the embedded digits model ships."""
    if model.kind in ("checkpoint", "diffusers_pipeline") and metric.kind == "fid" and metric.reference == "data":
        what = "a checkpoint" if model.kind == "checkpoint" else "a pipeline (its own images from the same prompts)"
        raise ValueError("metric.reference: 'data' needs the model's training set, which only the digits model "
                         f"ships; use reference: model (samples of a 100-NFE solve) for {what}")


def load_config(path) -> SearchConfig:
    """Read and validate a search-space YAML; ConfigError names the file and field."""
    from s3_ray.usf.schedule import read_text

    path = Path(path)
    text = read_text(path, error=ConfigError)  # bounded, UTF-8; names the file
    try:
        data = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # libyaml: fast, depth-bounded
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid YAML (nested too deeply)") from None
    return parse_config({} if data is None else data, str(path))  # an empty file: the defaults


def parse_config(data, source: str = "config") -> SearchConfig:
    """Validate a search space: its fields (pydantic), then what they imply together (``check_space``:
    noise schedule, NFE range, baselines). ConfigError names ``source`` and the field."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a search space is a mapping")
    try:
        cfg = SearchConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{source}: {_format_error(e)}") from None
    from s3_ray.search.preflight import check_space

    try:
        check_space(cfg)
    except ValueError as e:
        raise ConfigError(f"{source}: {e}") from None
    return cfg


def _format_error(e: ValidationError) -> str:
    """``format_validation_error``, with a section validator's ``field: reason`` joined to the
    section's name (``model: prompts: ...`` reads ``model.prompts: ...``)."""
    from s3_ray.usf.schedule import format_validation_error

    return re.sub(r"(^|; )([a-z_]+): ([a-z_]+): ", r"\1\2.\3: ", format_validation_error(e))


def with_overrides(cfg: SearchConfig, flags: dict[str, tuple[str, object]]) -> SearchConfig:
    """``cfg`` with command-line overrides, validated like the file: ``flags`` maps a field to
    (flag, value); None values are left out. A bad value raises ConfigError naming the flag."""
    update = {field: value for field, (_, value) in flags.items() if value is not None}
    if not update:
        return cfg
    try:
        out = SearchConfig.model_validate({**cfg.model_dump(), **update})
    except ValidationError as e:
        from s3_ray.usf.schedule import format_validation_error

        names = {field: flag for field, (flag, _) in flags.items()}
        msgs = []
        for err in e.errors():
            field = str(err["loc"][0]) if err["loc"] else ""
            msg = err["msg"].removeprefix("Value error, ")
            msgs.append(f"{names.get(field, field)}: {msg}")
        raise ConfigError("; ".join(msgs) or format_validation_error(e)) from None
    from s3_ray.search.preflight import check_space

    try:
        check_space(out)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return out
