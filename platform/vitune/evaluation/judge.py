"""The judge: any OpenAI-compatible chat endpoint (a hosted API, vLLM, vitune's own serving app).

A thin layer over ``vitune.llm_client.LLMClient`` (concurrency cap, retries with backoff on 429/5xx,
timeouts). Every verdict is cached on storage by (judge model, hash of the messages and sampling
parameters, repeat index), so re-running an evaluation sends no request. A request that fails for good
is returned as None and counted, never raised: one bad verdict must not sink a whole benchmark.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from vitune import layout
from vitune.config import JudgeConfig
from vitune.llm_client import LLMClient, LLMError, ResponseCache

log = logging.getLogger(__name__)


class Judge:
    """Ask many chats at once on a thread pool bounded by the endpoint's concurrency; failures → None."""

    def __init__(self, cfg: JudgeConfig, storage_root: str, client: LLMClient | None = None) -> None:
        self.cfg = cfg
        uri = layout.judge_cache(cfg, storage_root)
        self.client = client or LLMClient(cfg, cache=ResponseCache(uri) if uri else None)
        self.errors = 0

    @property
    def model(self) -> str:
        return self.cfg.model

    def ask_many(self, messages: Sequence[list[dict[str, str]]], repeat: int = 0) -> list[str | None]:
        """Reply texts in order; ``repeat > 0`` asks again with its own cache entry (for the spread)."""
        extra = f"repeat-{repeat}" if repeat else None
        requests = [{"messages": m, "cache_extra": extra} for m in messages]
        out: list[str | None] = []
        for res in self.client.chat_many(requests, max_workers=self.cfg.max_concurrency):
            if isinstance(res, LLMError):
                self.errors += 1
                log.warning("judge request failed: %s", res)
                out.append(None)
            else:
                out.append(res.content)
        return out

    def stats(self) -> dict[str, Any]:
        return {**self.client.stats.to_dict(), "model": self.cfg.model, "base_url": self.cfg.base_url}

    def close(self) -> None:
        self.client.close()
