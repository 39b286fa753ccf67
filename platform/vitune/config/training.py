"""The model, data, feature-store and training sections, and the configs of the features and train jobs."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from vitune.config.base import (
    STAGE_TUNABLE_PARTS,
    TUNABLE_PARTS,
    JobConfig,
    Section,
    Stage,
    _absolute_or_stage,
    _absolute_paths,
)
from vitune.vision_recipe import parse_grid_pinpoints


class VisionConfig(Section):
    name: str = "vitune-tiny-vit"  # open_clip model name (CLIP ViT, or SigLIP e.g. ViT-SO400M-14-SigLIP-384)
    pretrained: str | None = None  # open_clip tag, a local checkpoint file or (SigLIP) HF folder; None = random
    feature_layer: int = -2
    select: Literal["patch", "cls_patch"] = "patch"
    # LLaVA's --image_aspect_ratio: pad (expand2square) | square (resize + centre crop; also read as "crop") |
    # anyres (LLaVA-NeXT: base view + a grid of tiles) | anyres_max_N (OneVision: the unpadded grid capped at
    # about N tiles' worth). `image_mode`, its older name here, is read too.
    image_aspect_ratio: str = "pad"
    # anyres: the grid resolutions, [[h, w], ...] in pixels or LLaVA-NeXT's range form "(1x1),...,(3x3)"
    image_grid_pinpoints: str | list[list[int]] | None = None
    mm_patch_merge_type: Literal["flat", "spatial_unpad"] = "spatial_unpad"  # anyres: tiles laid flat | unpadded

    @model_validator(mode="before")
    @classmethod
    def _older_name(cls, raw: Any) -> Any:
        if isinstance(raw, dict) and "image_mode" in raw:
            if "image_aspect_ratio" in raw:
                raise ValueError(f"image_mode={raw['image_mode']!r} and image_aspect_ratio="
                                 f"{raw['image_aspect_ratio']!r} both given: image_mode is the older name of "
                                 "image_aspect_ratio; give one")
            raw = {("image_aspect_ratio" if k == "image_mode" else k): v for k, v in raw.items()}
        return raw

    @field_validator("image_aspect_ratio")
    @classmethod
    def _aspect(cls, v: str) -> str:
        if v in ("pad", "crop", "square", "anyres") or re.fullmatch(r"anyres_max_[1-9]\d*", v):
            return v
        raise ValueError(f"image_aspect_ratio {v!r}: expected pad, square (or crop), anyres or anyres_max_N")

    @model_validator(mode="after")
    def _grid(self) -> VisionConfig:
        if self.image_mode == "anyres":
            if not self.image_grid_pinpoints:
                raise ValueError(f"image_aspect_ratio={self.image_aspect_ratio} needs image_grid_pinpoints "
                                 "(e.g. '(1x1),...,(3x3)', or [[672, 336], [336, 672], ...] in pixels)")
            parse_grid_pinpoints(self.image_grid_pinpoints, 1)  # its form; the sizes need the tower's tile size
            if self.select != "patch":
                raise ValueError(f"image_aspect_ratio={self.image_aspect_ratio} keeps patch tokens only: "
                                 "select must be 'patch'")
        elif self.image_grid_pinpoints:
            raise ValueError(f"image_grid_pinpoints is only read by image_aspect_ratio=anyres or anyres_max_N, "
                             f"not {self.image_aspect_ratio!r}")
        return self

    @property
    def image_mode(self) -> str:
        """The vision recipe's aspect mode: ``pad``, ``crop`` or ``anyres``."""
        v = self.image_aspect_ratio
        return "crop" if v in ("crop", "square") else "anyres" if v.startswith("anyres") else v

    @property
    def max_tiles(self) -> int | None:
        """anyres_max_N's N (None: no cap)."""
        v = self.image_aspect_ratio
        return int(v.removeprefix("anyres_max_")) if v.startswith("anyres_max_") else None


class ModelConfig(Section):
    vision: VisionConfig = Field(default_factory=VisionConfig)
    projector: str = "mlp2x_gelu"
    lm: str = "tiny"  # Hugging Face causal LM path/name, or "tiny"
    tokenizer: str | None = None  # defaults to lm
    template: str = "vicuna_v1"
    max_length: int = Field(512, gt=8)


class DataConfig(Section):
    records: list[str] = Field(default_factory=list)  # LLaVA JSON/JSONL URIs
    image_root: str | None = None  # default: the folder of the first records file
    features: str | None = None  # feature store training reads; default: features.output, else layout's

    _paths = field_validator("records", "image_root", "features")(_absolute_paths)


class FeaturesConfig(Section):
    output: str | None = None  # store the feature job writes; default: data.features, else layout's
    shard_size: int = Field(256, gt=0)  # images per Parquet shard
    batch_size: int = Field(32, gt=0)  # tiles per tower call (pad/crop: images; anyres: an image makes several)
    num_actors: int | None = Field(None, gt=0)  # None = one per GPU on a cluster, CPUs locally
    actor_cpus: float = Field(1.0, gt=0)  # CPUs each tower actor reserves (on CPU, torch threads share all CPUs)
    preprocess_cpus: float = Field(1.0, gt=0)  # CPUs each decode+preprocess task reserves
    max_pixels: int = Field(64_000_000, gt=0)  # images over this (width x height) are quarantined
    # what the store holds: the frozen tower's features, or the preprocessed tiles a training tower reads
    # (the pixel store, ``vitune.features.pixels``). None = the recipe's pick: pixels when the tower trains
    form: Literal["features", "pixels"] | None = None
    pixel_dtype: Literal["uint8", "bf16"] = "uint8"  # pixel store: 0-255 before normalisation | normalised bf16

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
    # LLaVA-NeXT's --mm_tunable_parts: a comma-separated subset of mm_mlp_adapter, mm_language_model (the LM and
    # an anyres model's image_newline), mm_vision_tower; None = the stage's (align: the projector; finetune: + LM)
    mm_tunable_parts: str | None = None
    # LLaVA-NeXT's tower rate (OneVision: 2e-6); read with mm_vision_tower; None = train.lr
    mm_vision_tower_lr: float | None = Field(None, gt=0)
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
    # pack each micro-batch's samples several to a row (vitune.train.packing, data.collate_packed): the same
    # samples, loss and gradients as padded rows, fewer positions; attention never crosses a sample boundary
    packing: bool = True
    packing_budget: int | None = Field(None, gt=0)  # positions a packed row; None = packing.default_budget
    # per-sample budget of visual tokens (all its images together); a record over it is skipped and counted as
    # visual_token_budget. None = no budget (model.max_length still bounds text + visual tokens)
    max_visual_tokens: int | None = Field(None, gt=0)
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

    @field_validator("mm_tunable_parts")
    @classmethod
    def _parts(cls, v: str | None) -> str | None:
        if v is None:
            return None
        parts = [p.strip() for p in v.split(",") if p.strip()]
        unknown = [p for p in parts if p not in TUNABLE_PARTS]
        if not parts or unknown:
            hint = (" (vitune has no vision resampler)" if "mm_vision_resampler" in unknown else "")
            raise ValueError(f"mm_tunable_parts {v!r}: {', '.join(unknown) or 'no part'} is not a part{hint}; "
                             f"valid parts: {', '.join(TUNABLE_PARTS)}")
        return ",".join(p for p in TUNABLE_PARTS if p in parts)  # one spelling, in LLaVA-NeXT's order

    @model_validator(mode="after")
    def _tower_lr(self) -> TrainConfig:
        if self.mm_vision_tower_lr is not None and "mm_vision_tower" not in (self.mm_tunable_parts or ""):
            raise ValueError(f"mm_vision_tower_lr={self.mm_vision_tower_lr} is read only when mm_tunable_parts "
                             "includes mm_vision_tower")
        return self


class FeaturesJobConfig(JobConfig):
    """The features job takes every aspect mode: anyres stores hold each image's tiles and size."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    features: FeaturesConfig = Field(default_factory=FeaturesConfig)

    @property
    def store_form(self) -> str:
        """The store this job writes: ``features.form``, else features (a frozen tower's, computed once)."""
        return self.features.form or "features"


class TrainJobConfig(JobConfig):
    """A training stage. Every aspect mode trains: an anyres config trains on a tile store's ``[T, N, D]`` per
    image (the model packs them by its recipe, ``vitune.model.anyres``)."""

    stage: Stage = "align"
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    features: FeaturesConfig = Field(default_factory=FeaturesConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)

    @property
    def tunable_parts(self) -> tuple[str, ...]:
        """What trains (LLaVA-NeXT's part names): ``train.mm_tunable_parts``, else the stage's default."""
        named = self.train.mm_tunable_parts
        return tuple(named.split(",")) if named else STAGE_TUNABLE_PARTS[self.stage]

    @property
    def tower_trains(self) -> bool:
        """Whether the vision tower is one of the tuned parts (LLaVA-NeXT's ``mm_vision_tower``)."""
        return "mm_vision_tower" in self.tunable_parts

    @property
    def store_form(self) -> str:
        """The store this run reads, picked by the recipe: pixels when the tower trains (it runs in the step),
        else the frozen tower's features (computed once, no image decoded in training). ``features.form=pixels``
        with a frozen tower runs the frozen tower in the step (the two forms' equivalence case)."""
        return "pixels" if self.tower_trains else self.features.form or "features"

    @model_validator(mode="after")
    def _check_form(self) -> TrainJobConfig:
        if self.tower_trains and self.features.form == "features":
            raise ValueError("features.form='features' but the tower trains (train.mm_tunable_parts has "
                             "mm_vision_tower): it must run in the step on preprocessed pixels, and stored features "
                             "are the frozen tower's, computed once. Set features.form=pixels or leave it unset")
        return self

    @model_validator(mode="after")
    def _check_packing(self) -> TrainJobConfig:
        budget = self.train.packing_budget
        if budget is not None and budget < self.model.max_length:
            raise ValueError(f"train.packing_budget={budget} is below model.max_length={self.model.max_length}: a "
                             "sample may be that long (text + visual tokens) and would fit no packed row")
        return self

    @model_validator(mode="after")
    def _check_lora(self) -> TrainJobConfig:
        """LoRA is a finetune-stage option; QLoRA's 4-bit base cannot be sharded by ZeRO-3. (Whether this
        machine can run a 4-bit base at all is checked where the job runs: ``vitune.train.driver``.)"""
        lora = self.train.lora
        if lora.enabled and self.stage != "finetune":
            raise ValueError(f"train.lora.enabled=true needs stage=finetune (stage {self.stage!r} trains no LM "
                             "weights)")
        if lora.enabled and "mm_language_model" not in self.tunable_parts:
            raise ValueError(f"train.lora.enabled=true trains adapters on the LM, but train.mm_tunable_parts="
                             f"{self.train.mm_tunable_parts!r} does not tune mm_language_model")
        if lora.enabled and lora.quantization != "none" and self.train.zero_stage == 3:
            raise ValueError(f"train.lora.quantization={lora.quantization!r} (QLoRA) cannot run with ZeRO-3: it "
                             "partitions parameters and cannot shard a 4-bit base; use train.zero_stage=2")
        return self


class SyntheticConfig(Section):
    seed: int = 0
    num_images: int = Field(64, gt=0)
    num_eval_images: int = Field(16, ge=0)
    image_size: int = Field(64, ge=16)


class SyntheticJobConfig(JobConfig):
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)
