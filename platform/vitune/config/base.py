"""The pieces every job config shares: the section base, paths, stages, storage / tracking / Ray sections."""

from __future__ import annotations

from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator

from vitune import storage

MODELS_SCHEME = "models:/"  # a registered version in MLflow's registry (``vitune.references`` resolves it)
RUNS_SCHEME = "runs:/"  # a training run in MLflow (``vitune.references`` resolves it to the folder it wrote)
Stage = Literal["align", "finetune"]
STAGES: tuple[str, ...] = get_args(Stage)
# LLaVA-NeXT's --mm_tunable_parts names, and what each stage tunes when the config names none (LLaVA-NeXT's
# stage-1 scripts pass "mm_mlp_adapter", its finetune scripts add the LM; vitune's `stage` keeps that default)
TUNABLE_PARTS: tuple[str, ...] = ("mm_vision_tower", "mm_mlp_adapter", "mm_language_model")
STAGE_TUNABLE_PARTS: dict[str, tuple[str, ...]] = {
    "align": ("mm_mlp_adapter",),
    "finetune": ("mm_mlp_adapter", "mm_language_model"),
}


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class StorageConfig(Section):
    root: str = Field("./runs", validate_default=True)  # local folder or s3://bucket/prefix: data, features, runs
    s3_endpoint_url: str | None = None  # else AWS_ENDPOINT_URL

    @field_validator("root")
    @classmethod
    def _absolute(cls, v: str) -> str:
        return storage.absolute(v)


class TrackingConfig(Section):
    enabled: bool = True
    uri: str | None = None  # MLflow tracking URI; None = sqlite under the storage root (or MLFLOW_TRACKING_URI)
    experiment: str = "vitune"
    registered_model: str | None = None  # model registry name written at the end of finetune
    # how long a call the run needs (opening it, end-of-run tags/artifacts, registration) is retried while the
    # server does not answer; metrics logged meanwhile are held and sent once it does (vitune.backoff)
    retry_s: float = Field(120.0, ge=0)


class RayConfig(Section):
    address: str | None = None  # None = local Ray (or RAY_ADDRESS)
    num_cpus: int | None = None


def _absolute_paths(v: Any) -> Any:
    """Local paths pinned to the driver's cwd (Ray workers run in other directories); URIs unchanged."""
    if isinstance(v, str):
        return storage.absolute(v)
    if isinstance(v, list):
        return [storage.absolute(x) if isinstance(x, str) else x for x in v]
    return v


def _absolute_or_stage(v: Any) -> Any:
    """A model reference: a stage name (``align``), ``runs:/`` or ``models:/`` is kept for the resolver that
    runs when the job starts (``vitune.references``); a local path is pinned to the driver's cwd."""
    if v in STAGES or (isinstance(v, str) and v.startswith((RUNS_SCHEME, MODELS_SCHEME))):
        return v
    return _absolute_paths(v)


class JobConfig(Section):
    """The fields every job has: where things live, where runs go, which Ray."""

    storage: StorageConfig = Field(default_factory=StorageConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
