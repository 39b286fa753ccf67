"""The Serve application's config (serving/config.yaml's ``args``): model, batching, limits, remote images."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from vitune.config.base import MODELS_SCHEME

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
    max_image_pixels: int = Field(16_000_000, ge=1)  # width x height of each image, read from its header
    max_images_per_request: int = Field(4, ge=0)  # image_url parts over all messages of one request
    # all images of one request together, each counted as vision_recipe.visual_tokens (anyres: by its size)
    max_visual_tokens_per_request: int | None = Field(None, ge=1)  # None: only the context length bounds them
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
