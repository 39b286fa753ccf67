"""Typed configuration: one pydantic model per job, loaded from YAML with ``key.sub=value`` overrides.

A preset (``platform/vitune/presets/<name>.yaml``, named by its stem; or any YAML path or URI) holds the
sections of every job for one model; each job's model takes the sections it knows. ``stage: align |
finetune`` selects a block under ``stages:``, merged over the rest before overrides apply
(``vitune.config.tree``). Validation errors name the field and the value. Paths left unset default to
``vitune.layout``'s; model references (stage names, ``runs:/``, ``models:/``) are kept as given and resolved
when the job starts (``vitune.references``). Reading or validating a config imports no torch and starts
nothing: ``vitune.runtime.connect`` sets up storage and Ray when a job starts.

The modules, by role: ``base`` (shared sections, stages), ``training`` (model, data, features, train),
``generation`` (endpoints, instruction generation), ``evaluation`` (benchmarks, judge), ``serving`` (the
Serve app), ``loading`` (presets, YAML, overrides), ``tree`` (the raw tree's order of operations). Every
public name is importable from ``vitune.config`` itself.
"""

from vitune.config.base import (
    MODELS_SCHEME,
    RUNS_SCHEME,
    STAGE_TUNABLE_PARTS,
    STAGES,
    TUNABLE_PARTS,
    JobConfig,
    RayConfig,
    Section,
    Stage,
    StorageConfig,
    TrackingConfig,
)
from vitune.config.evaluation import EvalConfig, EvalJobConfig, JudgeConfig
from vitune.config.generation import EndpointConfig, GenerateConfig, GenerateJobConfig, GenerateTargets
from vitune.config.loading import (
    KNOWN_SECTIONS,
    PRESETS_DIR,
    build_config,
    dump_config,
    load_config,
    preset_names,
    resolve_preset,
)
from vitune.config.serving import API_KEY_ENV, RemoteImagesConfig, ServeConfig
from vitune.config.training import (
    DataConfig,
    FeaturesConfig,
    FeaturesJobConfig,
    LoraConfig,
    ModelConfig,
    SyntheticConfig,
    SyntheticJobConfig,
    TrainConfig,
    TrainJobConfig,
    VisionConfig,
)
from vitune.config.tree import ConfigError

__all__ = [
    "API_KEY_ENV", "KNOWN_SECTIONS", "MODELS_SCHEME", "PRESETS_DIR", "RUNS_SCHEME", "STAGES", "STAGE_TUNABLE_PARTS",
    "TUNABLE_PARTS", "ConfigError",
    "DataConfig", "EndpointConfig", "EvalConfig", "EvalJobConfig", "FeaturesConfig", "FeaturesJobConfig",
    "GenerateConfig", "GenerateJobConfig", "GenerateTargets", "JobConfig", "JudgeConfig", "LoraConfig",
    "ModelConfig", "RayConfig", "RemoteImagesConfig", "Section", "ServeConfig", "Stage", "StorageConfig",
    "SyntheticConfig", "SyntheticJobConfig", "TrackingConfig", "TrainConfig", "TrainJobConfig", "VisionConfig",
    "build_config", "dump_config", "load_config", "preset_names", "resolve_preset",
]
