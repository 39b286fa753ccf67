"""Instruction generation on local Ray against the scripted OpenAI-compatible server, output and cache on S3.

The server answers by image: well-formed outputs for most images, malformed ones for one, 429s (then
success) for another, and the same text for two images (a duplicate). Checks records, quarantine reasons,
retries, token accounting, MLflow params, and that a second run is served entirely from the cache.
"""

from __future__ import annotations

import json
import threading
import time
import uuid

import pytest
from mlflow.tracking import MlflowClient

from tests.fake_openai import Reply, fake_openai_fixture  # noqa: F401 - fixture `fake_openai`
from vitune import storage
from vitune.config import GenerateJobConfig, build_config
from vitune.data.records import read_records
from vitune.instruct.prompts import load_prompts
from vitune.instruct.run import run_generate

pytestmark = pytest.mark.integration

CAPTIONS = {
    1: ["A dog runs on a beach.", "A brown dog near the sea."],
    2: ["A red car parked on a street."],
    3: ["MALFORMED a bowl of fruit."],
    4: ["RATELIMIT two birds on a wire."],
    5: ["DUP a clock tower."],
    6: ["DUP a clock tower at noon."],
    7: [],  # no captions: an input error, not a task
}


def _write_coco(tmp_path) -> list[str]:
    images = [{"id": i, "file_name": f"{i:012d}.jpg", "width": 640, "height": 480} for i in CAPTIONS]
    anns = [{"id": 100 * i + j, "image_id": i, "caption": c} for i, caps in CAPTIONS.items()
            for j, c in enumerate(caps)]
    boxes = [{"id": 1000 + i, "image_id": i, "category_id": 1, "bbox": [64, 48, 320, 240]} for i in CAPTIONS]
    (tmp_path / "captions_t.json").write_text(json.dumps({"images": images, "annotations": anns}))
    (tmp_path / "instances_t.json").write_text(json.dumps(
        {"images": images, "annotations": boxes, "categories": [{"id": 1, "name": "thing"}]}))
    return [str(tmp_path / "captions_t.json"), str(tmp_path / "instances_t.json")]


def make_responder():
    systems = {p.system: kind for kind, p in load_prompts().items()}
    seen: dict[tuple[str, str], int] = {}
    lock = threading.Lock()

    def respond(req):
        time.sleep(0.05)  # long enough for the concurrency cap to matter
        kind = systems[req.messages[0]["content"]]
        ctx = req.last_user_text
        first = ctx.splitlines()[0]
        with lock:
            n = seen[(kind, first)] = seen.get((kind, first), 0) + 1
        if "RATELIMIT" in ctx and n == 1:
            return Reply(status=429, headers={"Retry-After": "0"})
        if "MALFORMED" in ctx:
            return {"conversation": "Sure, here is a chat about the fruit.",
                    "detail": "Fruit.",
                    "complex": "Question:\nWhy fruit?\n===\nQuestion:\nWhere?"}[kind]
        subject = "the clock tower" if "DUP" in ctx else first.rstrip(".")
        if kind == "conversation":
            return (f"Question:\nWhat is shown?\n===\nAnswer:\nThe image shows {subject}.\n===\n"
                    f"Question:\nIs it outdoors?\n===\nAnswer:\nYes, {subject} is outdoors.")
        if kind == "complex":
            return f"Question:\nWhat might happen next?\n===\nAnswer:\nGiven {subject}, things will likely stay calm."
        return f"The picture shows {subject} in clear light, with the thing placed near the middle of the frame."

    return respond


def test_generate_end_to_end_and_cached_rerun(ray_local, fake_openai, s3_bucket, tmp_path):
    fake_openai.responder = make_responder()
    root = f"{s3_bucket}/generate-{uuid.uuid4().hex[:8]}"
    cfg = build_config(GenerateJobConfig, {
        "storage": {"root": root},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "t-generate"},
        "generate": {
            "input": _write_coco(tmp_path), "format": "coco", "image_prefix": "train2017/",
            "endpoint": {"base_url": fake_openai.base_url, "model": "fake", "api_key_env": None,
                         "max_retries": 3, "backoff_initial_s": 0.01, "requests_per_second": 100,
                         "max_concurrency": 2, "timeout_s": 10},
            "workers": 2, "threads_per_worker": 3, "batch_size": 4,
            "price_per_1k_prompt": 0.5, "price_per_1k_completion": 1.5, "seed": 3,
        },
    })
    s = run_generate(cfg)
    assert not fake_openai.responder_errors
    assert fake_openai.max_in_flight == 2  # 2 workers × 3 threads, capped job-wide by the limiter actor

    # accounting: 6 usable images × 3 kinds = records + quarantined
    assert s["images"] == 6 and s["input_errors"] == {"no_captions": 1}
    assert s["tasks"] == 18 == s["records"] + s["quarantined"]
    assert s["quarantined_by_reason"] == {"missing_label": 1, "too_short": 1, "turns_out_of_order": 1,
                                          "duplicate_conversation": 3}
    assert s["records_per_kind"] == {"conversation": 4, "detail": 4, "complex": 4}
    # 429s were retried: one per kind for the RATELIMIT image
    assert fake_openai.count(429) == 3 and s["retries"] == 3
    assert s["requests_sent"] == fake_openai.count() == 21 and s["cache_hits"] == 0
    served = fake_openai.usage_totals()
    assert (s["prompt_tokens"], s["completion_tokens"]) == (served["prompt_tokens"], served["completion_tokens"])
    assert s["prompt_tokens"] > 0
    assert s["estimated_cost"] == pytest.approx(served["prompt_tokens"] / 1000 * 0.5
                                                + served["completion_tokens"] / 1000 * 1.5)

    # every written record is valid LLaVA data of its kind
    prompts = load_prompts()
    out = s["output"]
    # where everything went: the layout's paths under the storage root (cache, records, errors, summary)
    assert out == f"{root}/generate" and s["cache"] == f"{root}/llm_cache"
    assert s["record_files"]["detail"] == f"{out}/records/detail.json"
    assert s["errors_file"] == f"{out}/errors/errors.jsonl"
    assert storage.read_json(storage.join(out, "summary.json"))["records"] == 12
    by_kind = {k: read_records(uri) for k, uri in s["record_files"].items()}
    for kind, recs in by_kind.items():
        assert len(recs) == 4
        for r in recs:
            assert r.extra["kind"] == kind and r.extra["prompt_hash"] == prompts[kind].hash
            assert r.image.startswith("train2017/") and r.id == f"{r.image[10:22]}-{kind}"
            assert r.conversations[0].value.startswith("<image>\n")
    assert all(len(r.conversations) == 4 for r in by_kind["conversation"])
    assert all(r.conversations[0].value.removeprefix("<image>\n") in prompts["detail"].questions
               for r in by_kind["detail"])
    assert by_kind["complex"][0].conversations[0].value == "<image>\nWhat might happen next?"

    # quarantined outputs keep the raw text and the reason
    errors = storage.read_jsonl(s["errors_file"])
    assert len(errors) == 7
    gen = {(e["task_id"], e["reason"]): e for e in errors if e["stage"] == "generate"}
    assert gen[("000000000003-conversation", "missing_label")]["raw"] == "Sure, here is a chat about the fruit."
    assert gen[("000000000003-detail", "too_short")]["raw"] == "Fruit."
    assert {k[0] for k in gen if k[1] == "duplicate_conversation"} == {
        "000000000006-conversation", "000000000006-detail", "000000000006-complex"}

    # MLflow: prompt hashes as params, counts as metrics
    run = MlflowClient(cfg.tracking.uri).get_run(s["mlflow_run_id"])
    for kind, p in prompts.items():
        assert run.data.params[f"prompt_hash.{kind}"] == p.hash
    assert run.data.metrics["records"] == 12 and run.data.metrics["quarantined.too_short"] == 1
    assert run.data.tags["vitune.job"] == "generate_instructions"

    # second run: everything from the cache, nothing sent, same result
    fake_openai.clear()
    s2 = run_generate(cfg)
    assert fake_openai.count() == 0
    assert s2["requests_sent"] == 0 and s2["cache_hits"] == 18 and s2["prompt_tokens"] == 0
    assert s2["records_per_kind"] == s["records_per_kind"]
    assert s2["quarantined_by_reason"] == s["quarantined_by_reason"]
    assert [r.to_json() for r in read_records(s2["record_files"]["complex"])] == \
        [r.to_json() for r in by_kind["complex"]]


def test_a_budget_stops_the_job_cleanly_and_a_rerun_continues(ray_local, fake_openai, s3_bucket, tmp_path):
    fake_openai.responder = make_responder()
    root = f"{s3_bucket}/generate-budget-{uuid.uuid4().hex[:8]}"
    settings = {
        "storage": {"root": root},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "t-generate-budget"},
        "generate": {
            "input": _write_coco(tmp_path), "format": "coco", "image_prefix": "train2017/",
            "endpoint": {"base_url": fake_openai.base_url, "model": "fake", "api_key_env": None,
                         "max_retries": 3, "backoff_initial_s": 0.01, "requests_per_second": 100,
                         "max_concurrency": 2, "timeout_s": 10},
            "workers": 2, "threads_per_worker": 3, "batch_size": 4, "seed": 3,
            "price_per_1k_prompt": 0.5, "price_per_1k_completion": 1.5, "budget_cost": 0.0001,
        },
    }
    s = run_generate(build_config(GenerateJobConfig, settings))
    answered = fake_openai.count(200)
    # the first answer spends the budget; answers already in flight (at most max_concurrency) still land
    assert 1 <= answered <= 2 and s["requests_sent"] == fake_openai.count()
    assert not s["complete"] and s["not_run"] == 18 - answered
    assert s["tasks"] == 18 == s["records"] + s["quarantined"] + s["not_run"]
    assert storage.read_json(storage.join(s["output"], "summary.json"))["complete"] is False
    assert not any(e.get("reason") == "request_failed" for e in storage.read_jsonl(s["errors_file"]))

    # the rerun with no budget continues: what was paid for comes from the cache, only the rest is asked
    settings["generate"].pop("budget_cost")
    s2 = run_generate(build_config(GenerateJobConfig, settings))
    assert s2["complete"] and s2["not_run"] == 0 and s2["cache_hits"] == answered
    assert fake_openai.count(200) == 18  # every task answered once over both runs, none paid twice
    assert s2["records_per_kind"] == {"conversation": 4, "detail": 4, "complex": 4}
