"""Any OpenAI-compatible endpoint, and the instruction-data generation job's config (jobs/generate_instructions.py)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from vitune.config.base import JobConfig, Section


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
