"""Typed configuration: one pydantic model per job, loaded from YAML with ``key.sub=value`` overrides.

(Over 400 lines on purpose: every job's config in one file, so a preset's sections read side by side.)
A preset (``platform/vitune/presets/<name>.yaml``, named by its stem; or any YAML path or URI) holds the
sections of every job for one model; each job's model takes the sections it knows. ``stage: align |
finetune`` selects a block under ``stages:``, merged over the rest before overrides apply
(``vitune.config_tree``). Validation errors name the field and the value. Paths left unset default to
``vitune.layout``'s. Also here: the Serve application's config, and ``connect``: storage and Ray, set up
the same way by every job.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from vitune import progress, storage
from vitune.config_tree import ConfigError, resolve_tree, validation_message

log = logging.getLogger(__name__)

Stage = Literal["align", "finetune"]
STAGES: tuple[str, ...] = get_args(Stage)


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


class VisionConfig(Section):
    name: str = "vitune-tiny-vit"  # open_clip model name
    pretrained: str | None = None  # open_clip pretrained tag; None = random init
    feature_layer: int = -2
    select: Literal["patch", "cls_patch"] = "patch"
    image_mode: Literal["pad", "crop"] = "pad"


class ModelConfig(Section):
    vision: VisionConfig = Field(default_factory=VisionConfig)
    projector: str = "mlp2x_gelu"
    lm: str = "tiny"  # Hugging Face causal LM path/name, or "tiny"
    tokenizer: str | None = None  # defaults to lm
    template: str = "vicuna_v1"
    max_length: int = Field(512, gt=8)


def _absolute_paths(v: Any) -> Any:
    """Local paths pinned to the driver's cwd (Ray workers run in other directories); URIs unchanged."""
    if isinstance(v, str):
        return storage.absolute(v)
    if isinstance(v, list):
        return [storage.absolute(x) if isinstance(x, str) else x for x in v]
    return v


def _absolute_or_stage(v: Any) -> Any:
    """A stage name (``align``) is kept for ``_stage_model``; anything else is a path."""
    return v if v in STAGES else _absolute_paths(v)


def _stage_model(root: str, ref: str | None) -> str | None:
    """A stage name → that stage's model folder under ``root``, so the resolved config names the folder."""
    from vitune import layout  # deferred: layout derives its paths from the classes of this module

    return layout.stage_model(root, ref)


class DataConfig(Section):
    records: list[str] = Field(default_factory=list)  # LLaVA JSON/JSONL URIs
    image_root: str | None = None  # default: the folder of the first records file
    features: str | None = None  # feature store training reads; default: features.output, else layout's

    _paths = field_validator("records", "image_root", "features")(_absolute_paths)


class FeaturesConfig(Section):
    output: str | None = None  # store the feature job writes; default: data.features, else layout's
    shard_size: int = Field(256, gt=0)  # images per Parquet shard
    batch_size: int = Field(32, gt=0)
    num_actors: int | None = Field(None, gt=0)  # None = one per GPU on a cluster, CPUs locally
    actor_cpus: float = Field(1.0, gt=0)  # CPUs each tower actor reserves (on CPU, torch threads share all CPUs)
    preprocess_cpus: float = Field(1.0, gt=0)  # CPUs each decode+preprocess task reserves
    max_pixels: int = Field(64_000_000, gt=0)  # images over this (width x height) are quarantined

    _paths = field_validator("output")(_absolute_paths)


class LoraConfig(Section):
    """LoRA over the LM in the finetune stage (peft); the projector still trains fully (``train.mm_projector_lr``)."""

    enabled: bool = False
    r: int = Field(64, gt=0)  # rank
    alpha: float = Field(16, gt=0)  # scaling = alpha / r
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | None = None  # None = every nn.Linear of the LM but its head (LLaVA's default)
    bias: Literal["none", "all", "lora_only"] = "none"
    quantization: Literal["none", "nf4"] = "none"  # nf4 = QLoRA: 4-bit NF4 base, double quantisation, bf16 compute


class TrainConfig(Section):
    output: str | None = None  # default: layout's <storage.root>/train/<stage>
    init_from: str | None = None  # model-folder URI, runs:/<run id>, or a stage name (its model folder); None = new
    num_workers: int = Field(1, gt=0)
    use_gpu: bool = False
    cpus_per_worker: int = Field(1, gt=0)
    lr: float = Field(2e-3, gt=0)
    mm_projector_lr: float | None = Field(None, gt=0)  # the projector's own learning rate; None = train.lr
    weight_decay: float = Field(0.0, ge=0)
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = Field(0.03, ge=0, le=1)
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = None
    global_batch_size: int = Field(128, gt=0)
    micro_batch_size: int = Field(16, gt=0)
    zero_stage: Literal[0, 1, 2, 3] = 2
    grad_clip: float = Field(1.0, ge=0)
    gradient_checkpointing: bool = False
    tf32: bool = False  # TF32 matmuls (LLaVA's --tf32 True); applied only on GPUs of compute capability >= 8.0
    group_by_modality_length: bool = False  # LLaVA-1.5's megabatch sampler (vitune.train.sampler); off = random
    offload: bool = False
    checkpoint_every: int = Field(50, gt=0)
    log_every: int = Field(1, gt=0)
    max_failures: int = Field(2, ge=0)
    seed: int = 0
    materialize_below_mb: float = Field(256, ge=0)  # keep the joined data in the object store when smaller
    fail_at_step: int | None = None  # testing: the last rank raises once at this step (not after a resume)
    lora: LoraConfig = Field(default_factory=LoraConfig)

    _paths = field_validator("output")(_absolute_paths)
    _init = field_validator("init_from")(_absolute_or_stage)


class JobConfig(Section):
    """The fields every job has: where things live, where runs go, which Ray."""

    storage: StorageConfig = Field(default_factory=StorageConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    ray: RayConfig = Field(default_factory=RayConfig)


class FeaturesJobConfig(JobConfig):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    features: FeaturesConfig = Field(default_factory=FeaturesConfig)


class TrainJobConfig(JobConfig):
    stage: Stage = "align"
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    features: FeaturesConfig = Field(default_factory=FeaturesConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)

    @model_validator(mode="after")
    def _resolve_stage(self) -> TrainJobConfig:
        self.train.init_from = _stage_model(self.storage.root, self.train.init_from)
        if self.train.lora.enabled:
            _check_lora(self)
        return self


def _check_lora(cfg: TrainJobConfig) -> None:
    """LoRA is a finetune-stage option; QLoRA's 4-bit base needs bitsandbytes and a CUDA GPU."""
    if cfg.stage != "finetune":
        raise ValueError(f"train.lora.enabled=true needs stage=finetune (stage {cfg.stage!r} trains no LM weights)")
    if cfg.train.lora.quantization != "none":
        from vitune.model.lora import quantization_unavailable  # deferred: imports torch

        reason = quantization_unavailable()
        if cfg.train.zero_stage == 3:
            reason = "ZeRO-3 partitions parameters and cannot shard a 4-bit base; use train.zero_stage=2"
        if reason:
            raise ValueError(f"train.lora.quantization={cfg.train.lora.quantization!r} (QLoRA) cannot run here: "
                             f"{reason}; set train.lora.quantization=none for LoRA over the full-precision base")


class SyntheticConfig(Section):
    seed: int = 0
    num_images: int = Field(64, gt=0)
    num_eval_images: int = Field(16, ge=0)
    image_size: int = Field(64, ge=16)


class SyntheticJobConfig(JobConfig):
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)


# top-level sections that belong to some job; a job ignores the others' sections in a shared preset
KNOWN_SECTIONS = {
    "storage", "tracking", "ray", "model", "data", "features", "train", "stage", "stages", "synthetic",
    "eval", "generate", "serve", "pipeline", "judge",
}

C = TypeVar("C", bound=BaseModel)


def build_config(cls: type[C], raw: dict, overrides: list[str] | tuple[str, ...] = ()) -> C:
    """Validate ``raw`` (+ overrides, stage block merged) as ``cls``; errors name the field and value."""
    stage_field = cls.model_fields.get("stage")
    raw = resolve_tree(raw, overrides, stage_field.default if stage_field else None)
    for key in list(raw):
        if key not in cls.model_fields and key in KNOWN_SECTIONS:
            raw.pop(key)  # another job's section in a shared preset
    try:
        return cls.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(validation_message(err)) from None


PRESETS_DIR = Path(__file__).parent / "presets"


def preset_names() -> list[str]:
    """The presets shipped in the package (``tiny``, ``llava-v1.5-7b``, ...)."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def resolve_preset(path: str | Path) -> str:
    """A preset name → its packaged YAML; anything else (a local path or URI) is returned as it is.

    Names are looked up in the package, so the CLI and jobs find presets from any working directory.
    """
    text = str(path)
    if "/" not in text and not text.endswith((".yaml", ".yml")):
        candidate = PRESETS_DIR / f"{text}.yaml"
        if not candidate.exists():
            raise ConfigError(f"unknown preset {text!r}; valid presets: {', '.join(preset_names())} "
                              "(or give a YAML path or URI)")
        return str(candidate)
    return text


def load_config(cls: type[C], path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> C:
    """Load a job config from a preset name or a YAML file (local path or URI) with ``key.sub=value`` overrides."""
    raw: dict = {}
    if path is not None:
        path = resolve_preset(path)
        text = storage.read_text(path)
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: top level must be a mapping, got {type(raw).__name__}")
    return build_config(cls, raw, overrides)


def dump_config(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


# --- instruction-data generation (jobs/generate_instructions.py) and any OpenAI-compatible endpoint ---


class EndpointConfig(Section):
    """Any OpenAI-compatible chat endpoint (a hosted API, vLLM, or vitune's own serving app)."""

    base_url: str = "http://127.0.0.1:8000/v1"  # up to and including /v1
    model: str = "gpt-4o-mini"
    api_key_env: str | None = "OPENAI_API_KEY"  # env var holding the key; unset/empty = no Authorization header
    temperature: float = Field(0.7, ge=0, le=2)
    max_tokens: int = Field(1024, gt=0)
    timeout_s: float = Field(60.0, gt=0)
    max_concurrency: int = Field(8, gt=0)  # requests in flight across the whole job
    requests_per_second: float | None = Field(5.0, gt=0)  # across the whole job; None = no cap
    max_retries: int = Field(5, ge=0)  # retries after the first try, on 429 / 5xx / timeouts / connection errors
    backoff_initial_s: float = Field(1.0, ge=0)
    backoff_max_s: float = Field(60.0, ge=0)
    max_retry_after_s: float = Field(120.0, ge=0)  # the longest a server's Retry-After is waited before a retry


class GenerateTargets(Section):
    """Requests per kind; defaults in the paper's proportions (58K conversation : 23K detail : 77K complex)."""

    conversation: int = Field(58_000, ge=0)
    detail: int = Field(23_000, ge=0)
    complex: int = Field(77_000, ge=0)


class GenerateConfig(Section):
    input: str | list[str] = Field(default_factory=list)  # COCO JSONs (captions_*, instances_*) or JSONL URIs
    format: Literal["coco", "jsonl"] = "coco"
    image_prefix: str = ""  # prepended to COCO file_name in the records' "image" (e.g. "train2017/")
    max_images: int | None = Field(None, gt=0)  # read at most this many images (in input order)
    output: str | None = None  # default: layout's <storage.root>/generate
    prompts: str | None = None  # folder (URI) with custom <kind>.yaml prompt files; None = the packaged ones
    cache: str | None = None  # response cache URI; default: layout's <storage.root>/llm_cache
    use_cache: bool = True
    endpoint: EndpointConfig = Field(default_factory=EndpointConfig)
    targets: GenerateTargets = Field(default_factory=GenerateTargets)
    workers: int = Field(2, gt=0)  # Ray Data map workers
    threads_per_worker: int = Field(8, gt=0)  # requests a worker keeps in flight (the global cap still applies)
    batch_size: int = Field(16, gt=0)
    max_boxes: int = Field(50, ge=0)  # boxes per image in the context (largest first)
    coord_decimals: int = Field(3, ge=1, le=4)
    price_per_1k_prompt: float = Field(0.0, ge=0)  # currency units per 1K prompt tokens, for the cost estimate
    price_per_1k_completion: float = Field(0.0, ge=0)
    # what the job may spend (answers in this run; cache hits are free): reached, it sends nothing more, writes
    # what it has with summary.complete=false, and a rerun continues (its answers so far come from the cache)
    budget_tokens: int | None = Field(None, gt=0)  # prompt + completion tokens
    budget_cost: float | None = Field(None, gt=0)  # in the prices' currency (price_per_1k_*)
    seed: int = 0


class GenerateJobConfig(JobConfig):
    generate: GenerateConfig = Field(default_factory=GenerateConfig)


# --- evaluation (jobs/evaluate.py): ScienceQA, LLaVA-Bench, the synthetic held-out set; the judge ---


class JudgeConfig(EndpointConfig):
    """The judge: any OpenAI-compatible chat endpoint, plus how its verdicts are cached and repeated."""

    temperature: float = Field(0.2, ge=0, le=2)  # LLaVA's review temperature
    cache: str | None = None  # verdict cache URI; default: layout's <storage.root>/judge_cache
    use_cache: bool = True
    swap_order: bool = False  # LLaVA-Bench: a second pass with the two answers swapped → position bias
    repeats: int = Field(1, ge=1)  # LLaVA-Bench: judge every question this many times → spread (std) of the score


class EvalConfig(Section):
    benchmark: Literal["scienceqa", "llava_bench", "synthetic",
                       "pope", "mme", "textvqa", "gqa", "mmbench", "vqav2"] = "scienceqa"
    model_folder: str | None = None  # model folder URI, runs:/<training run id>, or a stage name (its model folder)
    model_run_id: str | None = None  # the training run to link; default: from runs:/ or the model folder
    data: str | None = None  # benchmark root URI (synthetic: the eval.json URI)
    images: str | None = None  # image root; default: <data>/images/<split> (ScienceQA), <data>/images (LLaVA-Bench)
    output: str | None = None  # default: layout's <storage.root>/eval/<benchmark>/<name>
    name: str | None = None  # default: the model folder's last path component
    predictions: str | None = None  # JSONL {question_id, text}: score these answers instead of generating
    limit: int | None = Field(None, gt=0)  # evaluate only the first N questions
    # ScienceQA
    split: str = "test"
    prompt_format: Literal["CQM-A", "QCM-LEA"] = "CQM-A"  # v1.5's single-letter prompt | the paper's model
    ensemble: bool = False  # ask the judge text-only; where it disagrees with us, let it decide given both
    extraction: Literal["official", "lenient"] = "official"  # answer letters: eval_science_qa.py's rule | vitune's
    judge_prompt: Literal["official", "vitune"] = "official"  # LLaVA-Bench: LLaVA's prompt + rule.json | our own
    # MMBench option extraction: the 2023 OpenCompass rule behind LLaVA-1.5's numbers | today's VLMEvalKit
    mmbench_rule: Literal["opencompass_2023", "vlmevalkit"] = "opencompass_2023"
    # LLaVA-Bench: file names under `data` (None = the layout's official names)
    layout: Literal["in_the_wild", "coco"] = "in_the_wild"
    questions: str | None = None  # also: the LLaVA question file (POPE, MME, TextVQA, GQA) or the MMBench TSV
    context: str | None = None
    references: str | None = None  # also: ground truth (POPE coco/, MME folder, TextVQA val JSON, GQA questions)
    # generation
    template: str | None = None  # conversation template; default: the model folder's
    max_new_tokens: int = Field(1024, gt=0)
    temperature: float = Field(0.0, ge=0)  # 0 = greedy
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int = 0
    batch_size: int = Field(8, gt=0)
    num_actors: int | None = Field(None, gt=0)  # None = one per GPU on a cluster, 1–2 locally
    use_gpu: bool | None = None  # None = when the cluster has GPUs


class EvalJobConfig(JobConfig):
    eval: EvalConfig = Field(default_factory=EvalConfig)
    judge: JudgeConfig = Field(default_factory=JudgeConfig)

    @model_validator(mode="after")
    def _resolve_stage(self) -> EvalJobConfig:
        self.eval.model_folder = _stage_model(self.storage.root, self.eval.model_folder)
        return self


# --- serving: the Serve application's args (serving/config.yaml) ---
MODELS_SCHEME = "models:/"
API_KEY_ENV = "VITUNE_API_KEY"


class RemoteImagesConfig(BaseModel):
    """Image URLs other than `data:`; off by default, and then limited to `allowed_hosts` / `allowed_buckets`.

    An http(s) host is resolved once and the connection pinned to that address; loopback, private, link-local,
    unique-local and metadata addresses are refused unless `allow_private_addresses`, and ports other than
    the scheme's default unless listed in `allowed_ports`. `timeout_s` bounds the whole fetch.
    """

    model_config = ConfigDict(extra="forbid")
    enabled: bool = False
    allowed_hosts: list[str] = Field(default_factory=list)  # "example.com", or ".example.com" for subdomains too
    allowed_buckets: list[str] = Field(default_factory=list)  # s3:// buckets images may come from
    allowed_ports: list[int] = Field(default_factory=list)  # beyond 80 (http) and 443 (https)
    allow_private_addresses: bool = False  # loopback/private/link-local hosts (tests, a trusted internal store)
    timeout_s: float = Field(10.0, gt=0)  # the whole fetch: resolution, connection, headers and body


class ServeConfig(BaseModel):
    """The Serve application's `args` (serving/config.yaml); validated once in `build_app`."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    model: str  # model folder URI (local or s3://) or models:/NAME/VERSION from the MLflow registry
    served_model_name: str | None = None  # default: NAME of models:/NAME/VERSION, else the folder's name
    # more served names → LoRA model folders over the same base as `model` (itself a LoRA folder), all on one
    # replica; a request's `model` picks one (vitune.serve.adapters)
    adapters: dict[str, str] = Field(default_factory=dict)
    tracking_uri: str | None = None  # for models:/ (else MLFLOW_TRACKING_URI)
    device: str = "auto"  # auto = cuda when available, else cpu
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"  # auto = the folder's dtype on GPU, fp32 on CPU
    max_batch_size: int = Field(32, ge=1)  # rows decoded together on one replica
    batch_wait_timeout_s: float = Field(0.01, ge=0)  # newcomers join after waiting this long (or a quiet gap this long)
    max_batch_wait_s: float = Field(0.1, ge=0)  # an idle replica waits at most this long for a first batch to fill
    max_queued: int = Field(32, ge=1)  # requests waiting to join on one replica; more get 429
    # requests a caller (the ingress for VLMEngine, the proxy for ChatAPI) holds while every replica is full;
    # more are answered 503 with Retry-After (Serve's max_queued_requests on both deployments)
    max_pending_requests: int = Field(256, ge=1)
    request_timeout_s: float = Field(120.0, gt=0)  # a request not answered by then gets 503 with Retry-After
    max_text_chars: int = Field(200_000, ge=1)  # all message text of one request together
    default_max_tokens: int = Field(256, ge=1)  # when a request names none (capped by the context left)
    context_length: int | None = Field(None, ge=2)  # default: the model's training max_length
    max_image_bytes: int = Field(10 * 1024 * 1024, ge=1)  # encoded size
    max_image_pixels: int = Field(16_000_000, ge=1)  # decoded width x height
    remote_images: RemoteImagesConfig = Field(default_factory=RemoteImagesConfig)
    # the key comes from the replica's VITUNE_API_KEY env only (a Kubernetes Secret), never from args, which the
    # Serve config and dashboard show; without it, binding beyond loopback refuses to start unless this is true
    allow_unauthenticated: bool = False
    unhealthy_after_failures: int = Field(3, ge=1)  # consecutive failed engine steps before the replica is unhealthy
    stuck_after_s: float = Field(300.0, gt=0)  # one engine step running this long marks the replica unhealthy
    stream_interval_s: float = Field(0.05, ge=0)  # streamed text is sent at most this often (first token at once)
    warmup: bool = True  # one short generation at load so the first request does not pay for it

    def model_name(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        if self.model.startswith(MODELS_SCHEME):
            return self.model[len(MODELS_SCHEME) :].split("/")[0].split("@")[0]
        return Path(self.model.rstrip("/")).name or "vitune"

    @model_validator(mode="before")
    @classmethod
    def _no_key_in_args(cls, data: Any) -> Any:
        if isinstance(data, dict) and "api_key" in data:
            raise ValueError(f"api_key is not accepted in the Serve args (the Serve config and dashboard show "
                             f"them); set the {API_KEY_ENV} env var of the replicas, e.g. from a Kubernetes Secret")
        return data

    def model_names(self) -> list[str]:
        """Every name a request may give as `model`: the served model's, then its adapters'."""
        return [self.model_name(), *self.adapters]

    def resolved_api_key(self) -> str | None:
        return os.environ.get(API_KEY_ENV) or None


# --- connecting the same way in every job: the config's S3 endpoint; Ray joined where a job runs, else started ---
def ray_init_kwargs(cfg: RayConfig) -> dict[str, Any]:
    """``ray.init`` arguments: resource sizes only when starting a local Ray (joining refuses them)."""
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address and address != "local":
        return {"address": address}
    return {"address": address, "num_cpus": cfg.num_cpus}


def init_ray(cfg: RayConfig, **kwargs: Any) -> None:
    """``ray.init`` unless this process is connected already (a job's driver, a test session)."""
    import ray  # deferred: configs are read by processes that never start Ray (CLI, Serve replicas, unit tests)

    if ray.is_initialized():
        return
    args = {**ray_init_kwargs(cfg), **kwargs}
    if progress.ray_log_file():  # the command line's default verbosity: Ray's logs go to files, not the terminal
        args.setdefault("log_to_driver", False)
        progress.route_ray_logs()
    log.info("starting Ray: %s", {k: v for k, v in args.items() if v is not None} or "local")
    ray.init(**args)
    progress.route_ray_logs()


def connect(cfg: JobConfig, start_ray: bool = False) -> None:
    """What every job sets up first: the S3 endpoint its config names, then Ray when ``start_ray``.

    Jobs that may find nothing to do (a complete feature store) connect to Ray later, only when needed.
    """
    if cfg.storage.s3_endpoint_url:
        storage.configure_s3(cfg.storage.s3_endpoint_url)
    if start_ray:
        init_ray(cfg.ray)
