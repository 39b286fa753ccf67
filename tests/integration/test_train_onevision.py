"""LLaVA-OneVision-shaped training through Ray: the tiny-onevision preset (tiny SigLIP tower, tiny Qwen2, anyres_max
over a (1x1)..(2x2) grid, plain then qwen_1_5) runs its features job, align and finetune on 2 Ray Train workers;
the folders, the runs and the registered version record the family, and the finetune loss falls.

The learning check (issue 24's bar): the Ray-trained model answers the synthetic set's held-out questions
(colour, shape, count) well above chance through vitune's evaluation path (`AnswerBatch`, the callable the eval
job's actors run: the folder's tower, prompt policy and the template's stops), and the model exported to llava-hf
answers them in transformers alone (`LlavaOnevisionForConditionalGeneration` and its processor's chat template)
within 0.05 of vitune.

Why these steps and a held learning rate: the tiny model first learns the answers' priors (every colour question
"red", every shape "circle") and reads the image only later; under the preset's cosine decay the late steps come
at too small a rate for that. Measured through the real per-worker loop in one process on this test's data (240
finetune steps of 16, lr 2e-3): cosine 0.26, constant 0.57 held-out; through Ray with cosine, 240-400 steps gave
0.26-0.37. With tied embeddings (tiny-qwen2's first version) it was slower still (0.27 vs 0.64 after 200 steps),
and the first version of this test, 48 steps, left it answering "<|im_start|>assistant".
`onevision_model_folder` returns the trained folder."""

from __future__ import annotations

import io
import json
import logging
import time

import numpy as np
import pytest
import torch

from vitune import storage
from vitune.config import FeaturesJobConfig, TrainJobConfig, load_config
from vitune.data import synthetic

pytestmark = pytest.mark.integration
log = logging.getLogger(__name__)
PRESET = "tiny-onevision"
FAMILY = "siglip + qwen2, anyres_max_4"
NUM_IMAGES, NUM_EVAL, ALIGN_EPOCHS, FINETUNE_EPOCHS = 256, 32, 2, 20  # 32 align and 320 finetune steps of 16
# finetune at the preset's lr, held (see the module docstring: under cosine decay the tiny model never got to the image)
FINETUNE_SCHEDULE = "train.lr_schedule=constant"
MIN_ACCURACY = 0.5  # chance is 0.306 (colour 1/4, shape 1/3, count 1/3); measured 0.72 (colour 1.0, count 0.81)
MAX_EXPORT_GAP = 0.05


def _base(root: str, features: str) -> list[str]:
    # tracking on the root's local MLflow store (the preset names no server): the family tags are checked there
    return [f"storage.root={root}", f"data.features={features}", "tracking.experiment=onevision-test",
            "tracking.registered_model=vitune-onevision-test", "train.num_workers=2",
            "train.micro_batch_size=8", "train.global_batch_size=16", "train.log_every=1"]


def onevision_model_folder(root: str) -> dict:
    """Features, align and finetune of tiny-onevision under ``root`` on the running Ray; returns the summaries
    (``finetune["model_folder"]`` is the trained model) and the synthetic data."""
    from vitune.features.extract import extract_features
    from vitune.train.driver import run_training

    data = synthetic.generate(storage.join(root, "data"), seed=3, num_images=NUM_IMAGES, num_eval_images=NUM_EVAL)
    recs = data["records"]
    feats = extract_features(load_config(FeaturesJobConfig, PRESET, [
        f"storage.root={root}", f"data.image_root={data['image_root']}",
        f"data.records=[{recs['captions']}, {recs['instruct']}]"]))
    base = _base(root, feats["output"])
    align = run_training(load_config(TrainJobConfig, PRESET, [
        "stage=align", *base, f"data.records={json.dumps([recs['captions']])}", f"train.epochs={ALIGN_EPOCHS}"]))
    finetune = run_training(load_config(TrainJobConfig, PRESET, [
        "stage=finetune", *base, f"data.records={json.dumps([recs['instruct']])}",
        f"train.epochs={FINETUNE_EPOCHS}", FINETUNE_SCHEDULE, f"train.init_from={align['model_folder']}"]))
    return {"root": root, "data": data, "features": feats, "align": align, "finetune": finetune}


@pytest.fixture(scope="module")
def trained(ray_local, tmp_path_factory):
    start = time.perf_counter()
    out = onevision_model_folder(str(tmp_path_factory.mktemp("onevision")))
    out["seconds"] = time.perf_counter() - start
    log.info("tiny-onevision features + align + finetune through Ray: %.0f s", out["seconds"])
    print(f"tiny-onevision through Ray: {out['seconds']:.0f} s")
    return out


def _held_out(trained: dict) -> tuple[list[dict], list[dict]]:
    from vitune.evaluation.synthetic import build_requests

    data = trained["data"]
    records = json.loads(storage.read_text(data["records"]["eval"]))
    return records, build_requests(records, data["image_root"])


@pytest.fixture(scope="module")
def vitune_answers(trained, tmp_path_factory) -> dict:
    """The finetuned folder's answers through the eval job's own callable (in this process: the job's actors
    run the same call), scored by the synthetic benchmark."""
    from vitune.evaluation.inference import AnswerBatch, GenerationSettings
    from vitune.evaluation.synthetic import score

    records, requests = _held_out(trained)
    answer = AnswerBatch(trained["finetune"]["model_folder"], str(tmp_path_factory.mktemp("answers")),
                         GenerationSettings(max_new_tokens=8))
    out = answer({"id": np.array([r["id"] for r in requests]),
                  "images": np.array([json.dumps([r["image"]]) for r in requests]),
                  "conversations": np.array([json.dumps(r["conversations"]) for r in requests])})
    assert not any(out["error"]), out["error"]
    from vitune.evaluation.inference import read_answers

    texts = {rid: row["text"] for rid, row in read_answers(answer.output_uri).items()}
    return {"texts": texts, "score": score(records, texts)}


def test_two_stages_train_on_two_workers_and_record_the_family(trained):
    from vitune.model.folder import read_meta

    for stage in ("align", "finetune"):
        summary = trained[stage]
        assert summary["stage"] == stage and np.isfinite(summary["metrics"]["loss"])
        meta = read_meta(summary["model_folder"])
        assert meta["family"] == FAMILY, meta["family"]
        assert meta["model"]["lm"] == "tiny-qwen2" and meta["lm"]["included"] is (stage == "finetune")
    assert trained["finetune"]["total_steps"] == FINETUNE_EPOCHS * NUM_IMAGES // 16


def test_finetune_loss_falls_and_mlflow_records_the_family(trained, capsys):
    from mlflow.tracking import MlflowClient

    from vitune.cli import models as models_cli
    from vitune.family import FAMILY_TAG
    from vitune.tracking import resolve_tracking_uri

    fine = trained["finetune"]
    client = MlflowClient(fine["tracking_uri"], registry_uri=fine["tracking_uri"])
    losses = [m.value for m in sorted(client.get_metric_history(fine["run_id"], "loss"), key=lambda m: m.step)]
    assert len(losses) == fine["total_steps"]
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5]), losses
    for stage in ("align", "finetune"):
        assert client.get_run(trained[stage]["run_id"]).data.tags[FAMILY_TAG] == FAMILY
    version = client.get_model_version("vitune-onevision-test", fine["registered_version"])
    assert version.tags[FAMILY_TAG] == FAMILY
    # `vitune models` shows it under the version
    capsys.readouterr()
    assert models_cli.main(["vitune-onevision-test", "--tracking-uri", fine["tracking_uri"]]) == 0
    listed = capsys.readouterr().out
    version_line = f"models:/vitune-onevision-test/{fine['registered_version']}"
    assert version_line in listed and f"family    {FAMILY}" in listed, listed
    assert listed.index(version_line) < listed.index(f"family    {FAMILY}"), listed
    assert fine["tracking_uri"] == resolve_tracking_uri(
        load_config(TrainJobConfig, PRESET, [f"storage.root={trained['root']}"]).tracking, trained["root"])


def test_the_ray_trained_model_answers_held_out_questions_well_above_chance(vitune_answers) -> None:
    result = vitune_answers["score"]
    print(f"tiny SigLIP + Qwen2 held-out accuracy: {result['accuracy']:.3f} (chance "
          f"{result['chance']['overall']:.3f}), per kind {result['per_kind']}")
    assert result["accuracy"] >= MIN_ACCURACY > result["chance"]["overall"] + 0.15, result
    assert result["errors"] == 0 and len(set(vitune_answers["texts"].values())) > 3, vitune_answers["texts"]


def test_the_llava_hf_export_answers_in_transformers_within_005_of_vitune(trained, vitune_answers,
                                                                           tmp_path) -> None:
    """The finetuned folder → `export_llava_hf` (LlavaOnevision: SigLIP + Qwen2, anyres_max_4); transformers alone,
    with the export's processor and chat template, answers the same held-out questions greedily."""
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vitune.evaluation.synthetic import score
    from vitune.model.export import export_llava_hf

    out = export_llava_hf(trained["finetune"]["model_folder"], str(tmp_path / "hf"))
    hf = AutoModelForImageTextToText.from_pretrained(out).eval()
    assert type(hf).__name__ == "LlavaOnevisionForConditionalGeneration"
    processor = AutoProcessor.from_pretrained(out)
    records, requests = _held_out(trained)
    texts = {}
    for req in requests:
        question = req["conversations"][0]["value"].replace("<image>", "").strip()
        image = Image.open(io.BytesIO(storage.read_bytes(req["image"])))
        messages = [{"role": "user", "content": [{"type": "image", "image": image.convert("RGB")},
                                                 {"type": "text", "text": question}]}]
        inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                               return_dict=True, return_tensors="pt")
        with torch.no_grad():
            ids = hf.generate(**inputs, max_new_tokens=8, do_sample=False)[0, inputs["input_ids"].shape[1]:]
        texts[req["id"]] = processor.decode(ids, skip_special_tokens=True).strip()
    theirs, ours = score(records, texts)["accuracy"], vitune_answers["score"]["accuracy"]
    print(f"held-out accuracy: vitune {ours:.3f}, transformers on the llava-hf export {theirs:.3f}")
    assert abs(theirs - ours) <= MAX_EXPORT_GAP, (theirs, ours)
