"""The vision tower in the training step (issue 25), in one process without Ray: the two store forms give the same
loss with the tower frozen; with ``mm_vision_tower`` tuned the tower's weights train at ``mm_vision_tower_lr``, the
folder keeps them, evaluation's loader uses them and transformers alone computes the exported model's logits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.unit.features.test_pixel_store import ANYRES, SIZES, _feature_store, _pixel_store, _png
from tests.unit.model.test_export import CONVERSATION, LOGITS_ATOL, vitune_turns
from tests.unit.train.worker_runs import run_worker
from vitune.config import ConfigError, TrainJobConfig, VisionConfig, load_config
from vitune.data.records import read_records
from vitune.data.tokenizer import load_tokenizer
from vitune.train.data import tokenize_row, training_row, with_image_sizes
from vitune.train.plan import param_groups
from vitune.train.worker import Worker
from vitune.vision_recipe import model_recipe

TOWER_PARTS = "mm_vision_tower,mm_mlp_adapter,mm_language_model"


def _cfg(tmp_path: Path, *overrides: str) -> TrainJobConfig:
    return load_config(TrainJobConfig, "tiny", [
        "stage=finetune", f"storage.root={tmp_path}", "train.num_workers=1", "train.init_from=null",
        "train.micro_batch_size=4", "train.global_batch_size=4", "train.zero_stage=2", "train.checkpoint_every=1000",
        "train.lr_schedule=constant", "train.warmup_ratio=0", "train.log_every=1", *overrides])


def _records(tmp_path: Path) -> str:
    recs = [{"id": f"r{i}", "image": key, "conversations": [
        {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": f"Shape {i} on {key}."}]}
        for i, key in enumerate(list(SIZES) * 2)]
    path = tmp_path / "records.json"
    path.write_text(json.dumps(recs))
    return str(path)


def _rows(cfg: TrainJobConfig, per_image: dict[str, np.ndarray], tokens: int | dict[str, int],
          sizes: dict[str, tuple[int, int]] | None = None) -> list[dict]:
    """Training rows of the records over one store's arrays; ``sizes`` (anyres) gives each image's size."""
    tok = load_tokenizer("tiny")
    rows = [tokenize_row(r, cfg.model.template, tok, cfg.model.max_length, tokens)
            for r in read_records(cfg.data.records[0])]
    rows = with_image_sizes(rows, sizes) if sizes else rows
    return [training_row(row, per_image[row.image_keys[0]]) for row in rows]


def _run(cfg: TrainJobConfig, rows: list[dict], feature_dim: int) -> tuple[list[dict], Worker]:
    run = run_worker(cfg, rows, feature_dim)
    return run.metrics, run.worker


def test_the_form_follows_the_tower_and_the_wrong_one_is_refused() -> None:
    cfg = load_config(TrainJobConfig, "tiny", ["stage=finetune", f"train.mm_tunable_parts={TOWER_PARTS}",
                                               "train.mm_vision_tower_lr=2e-6"])
    assert cfg.tower_trains and cfg.store_form == "pixels" and cfg.train.mm_vision_tower_lr == 2e-6
    with pytest.raises(ConfigError, match="features.form='features' but the tower trains .* Set features.form=pixels"):
        load_config(TrainJobConfig, "tiny", ["stage=finetune", f"train.mm_tunable_parts={TOWER_PARTS}",
                                             "features.form=features"])
    # a frozen tower may run in the step (the equivalence case); unset, it reads the feature store
    assert load_config(TrainJobConfig, "tiny", ["features.form=pixels"]).store_form == "pixels"
    assert load_config(TrainJobConfig, "tiny", []).store_form == "features"


@pytest.mark.parametrize("vision", [VisionConfig(), ANYRES], ids=["pad", "anyres"])
def test_one_step_from_either_store_gives_the_same_loss_with_the_tower_frozen(tmp_path, vision) -> None:
    tower, _, pixels = _pixel_store(tmp_path, vision)
    features = _feature_store(tmp_path, vision)
    records = _records(tmp_path)
    common = [f"data.records=[{records}]", "train.max_steps=1"]
    if vision.image_mode == "anyres":
        grid = json.dumps(vision.image_grid_pinpoints)
        common += ["model.vision.image_aspect_ratio=anyres", f"model.vision.image_grid_pinpoints={grid}"]
    cfg_f = _cfg(tmp_path / "f", *common)
    cfg_p = _cfg(tmp_path / "p", *common, "features.form=pixels")
    recipe = model_recipe(cfg_f.model.vision)
    tokens = features.visual_tokens(recipe) if recipe is not None else tower.num_patches
    sizes = features.image_sizes() if recipe is not None else None
    assert recipe is None or pixels.visual_tokens(recipe) == tokens
    loss_f, _ = _run(cfg_f, _rows(cfg_f, features.get(SIZES), tokens, sizes), tower.hidden_size)
    loss_p, worker = _run(cfg_p, _rows(cfg_p, pixels.get(SIZES), tokens, sizes), tower.hidden_size)
    assert worker.model.vision_tower is not None and not any(
        p.requires_grad for p in worker.model.vision_tower.parameters())
    assert worker.trainable.get("trainable_vision_tower", 0) == 0
    assert worker.model.recipe == recipe  # anyres: the tiles are packed by the recipe in both runs
    # the feature store rounds features to fp16; everything else is the same fp32 computation
    assert loss_p[0]["loss"] == pytest.approx(loss_f[0]["loss"], rel=1e-4)
    assert loss_p[0]["loss"] > 1.0  # a real loss, not a degenerate zero


def test_a_tuned_tower_trains_saves_serves_and_exports(tmp_path) -> None:
    from vitune.model.export import export_llava_hf
    from vitune.model.folder import load_for_inference
    from vitune.model.vision import encode_images, load_vision_tower

    vision = VisionConfig()
    tower, _, pixels = _pixel_store(tmp_path, vision)
    cfg = _cfg(tmp_path, f"data.records=[{_records(tmp_path)}]", "train.max_steps=2", "train.epochs=4", "train.lr=1e-3",
               f"train.mm_tunable_parts={TOWER_PARTS}", "train.mm_vision_tower_lr=2e-2", "train.weight_decay=0.1",
               "train.gradient_checkpointing=true")
    metrics, worker = _run(cfg, _rows(cfg, pixels.get(SIZES), tower.num_patches), tower.hidden_size)
    assert len(metrics) == 2 and all(np.isfinite(m["loss"]) for m in metrics)
    trained = worker.model.vision_tower
    assert trained.trains and trained.grad_checkpointing
    assert worker.trainable["trainable_vision_tower"] == sum(p.numel() for p in tower.parameters())
    # LLaVA-NeXT's groups: the tower at its own rate, biases and norms without decay
    groups = {(g["part"], g["weight_decay"]): g["lr"] for g in param_groups(worker.model, 1e-3, None, 0.1, 2e-2)}
    assert groups == {("rest", 0.1): 1e-3, ("rest", 0.0): 1e-3, ("projector", 0.1): 1e-3, ("projector", 0.0): 1e-3,
                      ("vision_tower", 0.1): 2e-2, ("vision_tower", 0.0): 2e-2}
    fresh = load_vision_tower(vision)
    moved = [n for (n, p0), p1 in zip(fresh.named_parameters(), trained.parameters(), strict=True)
             if not torch.equal(p0, p1.detach().cpu())]
    assert len(moved) > len(list(fresh.parameters())) // 2, f"only {moved} of the tower trained"

    folder = str(tmp_path / "train" / "finetune" / "model")
    loaded = load_for_inference(folder, device="cpu")
    assert loaded.meta["vision_tower"]["trained"] and loaded.meta["fingerprint"]["tower_weights"] == "trained"
    for p0, p1 in zip(trained.parameters(), loaded.tower.parameters(), strict=True):
        assert torch.equal(p0.detach().cpu(), p1)  # evaluation and serving answer with the trained tower

    # a folder's trained tower cannot go on training from the pretrained tower's feature store
    from vitune.train.plan import Plan

    again = _cfg(tmp_path / "again", f"data.records=[{cfg.data.records[0]}]", f"train.init_from={folder}")
    with pytest.raises(ValueError, match="holds a trained vision tower, and a feature store holds the pretrained"):
        Worker(again, Plan(8, 1, 4, 1, 1.0, None), 0, 1, tower.hidden_size)

    image_path = tmp_path / "image.png"
    image_path.write_bytes(_png((48, 20), 9))
    hf_folder = export_llava_hf(folder, str(tmp_path / "hf"))
    # transformers alone on the export (in this process: its model code, not vitune's, computes the logits)
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    hf_model, info = LlavaForConditionalGeneration.from_pretrained(hf_folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    processor = AutoProcessor.from_pretrained(hf_folder, backend="pil")  # vitune resizes with PIL
    messages = [{**m, "content": [{**part, "image": Image.open(image_path).convert("RGB")} if part["type"] == "image"
                                  else part for part in m["content"]]} if isinstance(m["content"], list) else m
                for m in CONVERSATION]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    with torch.no_grad():
        hf = {"logits": hf_model.eval()(**inputs).logits[0]}

    from vitune.data.masks import tokenize_generation_prompt

    ids = tokenize_generation_prompt(vitune_turns(CONVERSATION)[0], cfg.model.template, loaded.tokenizer)
    image = Image.open(image_path).convert("RGB")

    def logits(tower) -> torch.Tensor:
        with torch.no_grad():
            return loaded.model(torch.tensor([ids]), image_features=encode_images(tower, [image])).logits[0]

    torch.testing.assert_close(hf["logits"], logits(loaded.tower), rtol=0, atol=LOGITS_ATOL)
    # the export holds the trained tower: the pretrained one gives other logits
    assert (hf["logits"] - logits(fresh)).abs().max() > 100 * LOGITS_ATOL


def test_the_pipeline_derives_the_pixel_store_when_a_stage_tunes_the_tower(tmp_path) -> None:
    import yaml

    from vitune.config.loading import resolve_preset
    from vitune.pipeline import step_configs

    preset = yaml.safe_load(Path(resolve_preset("tiny")).read_text())
    assert {s: c.store_form for s, c in step_configs(str(resolve_preset("tiny"))).items() if s != "eval"} == {
        "features": "features", "align": "features", "finetune": "features"}
    preset["stages"]["finetune"]["train"]["mm_tunable_parts"] = TOWER_PARTS
    path = tmp_path / "tower.yaml"
    path.write_text(yaml.safe_dump(preset))
    configs = step_configs(str(path))
    # one store for the pipeline: the finetune tunes the tower, the align runs its frozen tower on the same pixels
    assert {s: c.store_form for s, c in configs.items() if s != "eval"} == {
        "features": "pixels", "align": "pixels", "finetune": "pixels"}
    assert configs["finetune"].tower_trains and not configs["align"].tower_trains


@pytest.mark.parametrize("extra", [["train.zero_stage=3"], ["train.lora.enabled=true", "train.lora.r=4"]],
                         ids=["zero3", "lora"])
def test_the_tower_trains_and_is_saved_under_zero3_and_beside_lora(tmp_path, extra) -> None:
    from vitune.model.folder import load_for_inference
    from vitune.model.vision import load_vision_tower

    tower, _, pixels = _pixel_store(tmp_path, VisionConfig())
    cfg = _cfg(tmp_path, f"data.records=[{_records(tmp_path)}]", "train.max_steps=2", "train.epochs=4",
               f"train.mm_tunable_parts={TOWER_PARTS}", "train.mm_vision_tower_lr=2e-2", *extra)
    _, worker = _run(cfg, _rows(cfg, pixels.get(SIZES), tower.num_patches), tower.hidden_size)
    assert worker.trainable["trainable_vision_tower"] == sum(p.numel() for p in tower.parameters())
    loaded = load_for_inference(str(tmp_path / "train" / "finetune" / "model"), device="cpu")
    assert bool(loaded.meta["lm"].get("adapter")) == worker.lora == cfg.train.lora.enabled
    fresh = load_vision_tower(VisionConfig())
    moved = [n for (n, p0), p1 in zip(fresh.named_parameters(), loaded.tower.parameters(), strict=True)
             if not torch.equal(p0, p1)]
    assert len(moved) > len(list(fresh.parameters())) // 2


def test_a_served_adapter_with_its_own_trained_tower_is_refused() -> None:
    from vitune.serve.adapters import _same_base

    fp = {"tower": "vitune-tiny-vit", "tower_weights": "trained"}
    base = {"lm": {"adapter": "adapter", "source": "tiny", "base_digest": "d"}, "fingerprint": fp,
            "vision_tower": {"trained": True}}
    _same_base("plain", {**base, "vision_tower": None}, base)  # the same features, the served model's tower
    with pytest.raises(ValueError, match="adapters.other: its run trained its own vision tower"):
        _same_base("other", base, base)
