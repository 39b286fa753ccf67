"""A tower that trains, through Ray: the pixel job writes the synthetic set's tiles to S3, a tiny model tunes
mm_vision_tower,mm_mlp_adapter,mm_language_model in stage 2 on 2 Ray Train workers (ZeRO-2, the tower in the
optimizer at its own rate), the last worker fails once and the run resumes from its checkpoint, and the model
folder holds a tower whose weights moved from the pretrained ones. Exported to llava-hf, the trained tower goes
with it: transformers alone (the export's model and processor) answers the training images as vitune's evaluation
callable does, on at least 95% of them."""

from __future__ import annotations

import io
import json
import uuid

import numpy as np
import pytest
import torch

from vitune import storage
from vitune.config import FeaturesJobConfig, TrainJobConfig, load_config
from vitune.data import synthetic

pytestmark = pytest.mark.integration
TOWER_PARTS = "mm_vision_tower,mm_mlp_adapter,mm_language_model"


def test_a_tuned_tower_trains_from_the_pixel_store_and_resumes_after_a_failure(ray_local, s3_bucket, tmp_path):
    from vitune.features.extract import extract_features
    from vitune.features.pixels import PixelStore
    from vitune.model.folder import load_for_inference
    from vitune.model.vision import load_vision_tower
    from vitune.train.driver import run_training

    root = f"{s3_bucket}/tower-{uuid.uuid4().hex[:8]}"
    data = synthetic.generate(storage.join(root, "data"), seed=5, num_images=16, num_eval_images=0)
    records = [data["records"]["captions"]]
    common = [f"storage.root={root}", "tracking.enabled=false", f"data.records={json.dumps(records)}",
              f"data.image_root={data['image_root']}"]
    pixels = extract_features(load_config(FeaturesJobConfig, "tiny", [*common, "features.form=pixels"]))
    assert PixelStore.open(pixels["output"]).counts["images_in"] == 16

    cfg = load_config(TrainJobConfig, "tiny", [
        *common, "stage=finetune", "model.template=plain", "train.init_from=null", f"data.features={pixels['output']}",
        f"train.mm_tunable_parts={TOWER_PARTS}", "train.mm_vision_tower_lr=1e-2", "train.gradient_checkpointing=true",
        "train.zero_stage=2", "train.num_workers=2", "train.micro_batch_size=4", "train.global_batch_size=8",
        "train.epochs=2", "train.log_every=1", "train.checkpoint_every=2", "train.fail_at_step=3",
        "train.max_failures=1", "train.group_by_modality_length=false"])
    assert cfg.store_form == "pixels"
    summary = run_training(cfg)
    assert summary["total_steps"] == 4 and summary["metrics"]["step"] == 4
    assert summary["metrics"]["resumed_from"] == 2  # from the checkpoint, tower and optimizer state included
    assert np.isfinite(summary["metrics"]["loss"])

    served = load_for_inference(summary["model_folder"], device="cpu")
    assert served.meta["fingerprint"]["tower_weights"] == "trained"
    pretrained = load_vision_tower(cfg.model.vision)
    moved = [n for (n, p0), p1 in zip(pretrained.named_parameters(), served.tower.parameters(), strict=True)
             if not torch.equal(p0, p1)]
    assert len(moved) > len(list(pretrained.parameters())) // 2

    # the export carries the trained tower: transformers alone answers as vitune does
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vitune.evaluation.inference import AnswerBatch, GenerationSettings, read_answers
    from vitune.model.export import export_llava_hf

    caps = json.loads(storage.read_text(records[0]))
    question = "Describe the image briefly."
    out_uri = storage.join(root, "answers")
    ids = [r["id"] for r in caps]
    uris = [storage.join(data["image_root"], r["image"]) for r in caps]
    AnswerBatch(summary["model_folder"], out_uri, GenerationSettings(max_new_tokens=12))(
        {"id": np.array(ids), "images": np.array([json.dumps([u]) for u in uris]),
         "conversations": np.array([json.dumps([{"from": "human", "value": f"<image>\n{question}"}])] * len(ids))})
    ours = {rid: row["text"] for rid, row in read_answers(out_uri).items()}
    hf_dir = export_llava_hf(summary["model_folder"], str(tmp_path / "hf"))
    hf = AutoModelForImageTextToText.from_pretrained(hf_dir).eval()
    processor = AutoProcessor.from_pretrained(hf_dir)
    theirs = {}
    for rid, uri in zip(ids, uris, strict=True):
        image = Image.open(io.BytesIO(storage.read_bytes(uri))).convert("RGB")
        messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                                 {"type": "text", "text": question}]}]
        inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                               return_dict=True, return_tensors="pt")
        with torch.no_grad():
            new = hf.generate(**inputs, max_new_tokens=12, do_sample=False)[0, inputs["input_ids"].shape[1]:]
        theirs[rid] = processor.decode(new, skip_special_tokens=True).strip()
    assert sum(bool(t) for t in ours.values()) >= len(ids) // 2, ours  # answers to compare, not empty strings
    agree = sum(ours[rid] == theirs[rid] for rid in ids) / len(ids)
    assert agree >= 0.95, [(ours[r], theirs[r]) for r in ids if ours[r] != theirs[r]]
