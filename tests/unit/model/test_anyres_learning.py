"""The AnyRes learning check: on the synthetic detail set (`vitune.data.synthetic.detail_examples`: a small square
of 1-px checks in a colour and its complement, on 96x32 / 32x96 images), the tiny anyres model learns which pair
checks the square and the tiny pad model does not.

The two models differ only in the image path. Both are `build_model` on the tiny LM with the same seeded
projector and LM init, the same frozen random 32-px tower (`load_vision_tower`, seeded), the same training
records, batch order, steps and learning rate (AdamW over the projector, the LM and, for anyres, the image
newline: the finetune stage's trainable set). The pad model sees each image padded to a square and shrunk to
32 px, where every pair blends to the same grey (tests/unit/data/test_synthetic.py measures it); the anyres
model sees LLaVA-1.6's grid at 32-px tiles, which holds a 96x32 image at full resolution. Then each answers the
held-out questions greedily (`VisionLanguageModel.generate`), scored by exact match.

Why checks and not a few-pixel solid dot: a 2-6 px dot of one of four colours was learned by neither model here
(both at chance after 400-600 steps at lr 1e-3 or 3e-3), so it could not tell the two paths apart; and a solid
colour never leaves the pad view entirely, it only fades to a tint. The checks carry their pair in every pixel of
the square at full resolution, while the three pairs' pad views differ by at most 8 of 255 levels.

A control run shows the pad model is not simply unable to learn in this loop: on the same scenes with plain
squares (`solid=True`, the pair's first colour), which survive its view, it learns them.

The trained anyres model is then saved as a vitune model folder and exported to llava-hf
(`export_llava_hf`: `LlavaNextForConditionalGeneration` + its processor); transformers alone, from the exported
folder, answers the same held-out questions (its processor's chat template and tiles, `generate` greedy) within
0.05 of vitune's accuracy.

Measured (seed 0, 384 train / 60 held-out images, 300 steps of 16, lr 3e-3, one CPU thread): anyres 0.87, pad
0.33, chance 1/3 (three balanced pairs); control, pad on plain squares, 0.95. Data seeds 1-4 in the same
settings: anyres 1.00 / 1.00 / 1.00 / 0.88, pad 0.33 every time. About 55 s for the three runs and 70 s
with the export check on a 2-core machine shared with other work; it runs in `make test` (the issue's proof).
"""

from __future__ import annotations

import dataclasses
import logging
import time

import pytest
import torch

from vitune import IGNORE_INDEX, IMAGE_TOKEN
from vitune.config import ModelConfig, VisionConfig
from vitune.data import synthetic
from vitune.data.masks import tokenize_generation_prompt, tokenize_record
from vitune.data.records import validate_record
from vitune.data.tokenizer import load_tokenizer
from vitune.model.vision import encode_image_tiles, load_vision_tower
from vitune.model.vlm import build_model
from vitune.vision_recipe import VisionRecipe, parse_grid_pinpoints, visual_tokens

log = logging.getLogger(__name__)

# LLaVA-1.6's grid ([[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]) at 32-px tiles, (h, w)
LLAVA_16_GRID_PX = [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]
SEED, NUM_TRAIN, NUM_EVAL = 0, 384, 60
STEPS, BATCH, LR = 300, 16, 3e-3
TEMPLATE, MAX_LENGTH = "vicuna_v1", 512
# the bar is the gap; the floor keeps anyres well above chance. The same seeded run gives 0.867 on some
# machines and 0.667 on others (CPU kernels round differently over 300 steps), so the floor sits below both
MIN_GAP, MIN_ANYRES = 0.10, 0.60
MAX_EXPORT_GAP = 0.05  # transformers' accuracy on the exported model vs vitune's own


def _recipes() -> dict[str, VisionRecipe]:
    pad = VisionRecipe.of(VisionConfig())
    return {"pad": pad, "anyres": dataclasses.replace(pad, image_mode="anyres",
                                                      grid_pinpoints=parse_grid_pinpoints(LLAVA_16_GRID_PX, 32))}


def _train_and_answer(recipe: VisionRecipe, data: dict, tokenizer) -> dict:
    """Train one tiny model on the detail set's train split, then greedy-answer its held-out split."""
    tower = load_vision_tower(VisionConfig(), recipe=recipe)
    images = {split: [scene.render() for scene, _ in examples] for split, examples in data.items()}
    with torch.no_grad():  # the tower is frozen: its tiles' features are computed once
        feats = {split: encode_image_tiles(tower, imgs) for split, imgs in images.items()}  # each [T, N, Dv]
    sizes = {split: [img.size for img in imgs] for split, imgs in images.items()}
    model = build_model(ModelConfig(), tokenizer, tower.hidden_size, recipe=tower.recipe)
    model.freeze_for_stage("finetune")
    samples = [tokenize_record(validate_record(rec), TEMPLATE, tokenizer, MAX_LENGTH,
                               visual_tokens=[visual_tokens(tower.recipe, *img.size)])
               for (_, rec), img in zip(data["train"], images["train"], strict=True)]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    order = torch.Generator().manual_seed(SEED)  # the same batches for both models
    losses = []
    model.train()
    for _ in range(STEPS):
        batch = torch.randint(len(samples), (BATCH,), generator=order).tolist()
        width = max(len(samples[i].input_ids) for i in batch)
        ids = torch.full((BATCH, width), tokenizer.pad_token_id)  # [B, T], right padded
        labels = torch.full((BATCH, width), IGNORE_INDEX)
        mask = torch.zeros((BATCH, width), dtype=torch.long)
        for row, i in enumerate(batch):
            n = len(samples[i].input_ids)
            ids[row, :n] = torch.tensor(samples[i].input_ids)
            labels[row, :n] = torch.tensor(samples[i].labels)
            mask[row, :n] = 1
        out = model(ids, mask, labels, image_features=[feats["train"][i] for i in batch],
                    image_sizes=[sizes["train"][i] for i in batch])
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(float(out.loss.detach()))
    model.eval()
    prompts = [tokenize_generation_prompt(rec["conversations"][:1], TEMPLATE, tokenizer) for _, rec in data["eval"]]
    with torch.no_grad():
        tokens = model.generate(prompts, feats["eval"], image_sizes=sizes["eval"], max_new_tokens=8)
    answers = [tokenizer.decode(t, skip_special_tokens=True).strip() for t in tokens]
    right = [answer == rec["answer"] for answer, (_, rec) in zip(answers, data["eval"], strict=True)]
    return {"accuracy": sum(right) / len(right), "answers": answers, "losses": losses,
            "visual_tokens": visual_tokens(tower.recipe, 96, 32), "model": model, "tower": tower}


@pytest.fixture(scope="module")
def runs() -> dict[str, dict]:
    """The three runs: anyres and pad on the checked squares, and pad on the solid control squares."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the run is the same every time, and it leaves the machine's other core alone
    try:
        start = time.perf_counter()
        tokenizer = load_tokenizer("tiny")
        checks = synthetic.detail_examples(SEED, NUM_TRAIN, NUM_EVAL)
        solid = synthetic.detail_examples(SEED, NUM_TRAIN, NUM_EVAL, solid=True)
        recipes = _recipes()
        out = {"anyres": _train_and_answer(recipes["anyres"], checks, tokenizer),
               "pad": _train_and_answer(recipes["pad"], checks, tokenizer),
               "pad_solid": _train_and_answer(recipes["pad"], solid, tokenizer)}
    finally:
        torch.set_num_threads(before)
    chance = synthetic.detail_chance_accuracy()
    summary = (f"held-out detail accuracy: anyres {out['anyres']['accuracy']:.3f} ({out['anyres']['visual_tokens']} "
               f"visual tokens for 96x32), pad {out['pad']['accuracy']:.3f} ({out['pad']['visual_tokens']}), "
               f"chance {chance:.3f}; control, pad on solid squares: {out['pad_solid']['accuracy']:.3f}; "
               f"{time.perf_counter() - start:.0f} s")
    print(summary)  # pytest -s shows the measured numbers
    log.info(summary)
    return {**out, "summary": summary, "chance": chance}


def test_anyres_answers_the_detail_questions_the_pad_model_cannot(runs: dict) -> None:
    pad, anyres = runs["pad"]["accuracy"], runs["anyres"]["accuracy"]
    for mode in ("anyres", "pad"):  # both trained: the loss fell, so the gap is not one model failing to run
        losses = runs[mode]["losses"]
        assert sum(losses[-10:]) < 0.5 * sum(losses[:10]), (mode, losses)
    # the pad model's answers are well-formed pair names: it learned the answer's form, not the detail
    assert set(runs["pad"]["answers"]) <= set(synthetic.DETAIL_PAIRS), runs["pad"]["answers"]
    assert anyres - pad >= MIN_GAP, runs["summary"]
    assert anyres >= MIN_ANYRES > runs["chance"] + 0.25, runs["summary"]


def test_the_pad_model_learns_the_same_squares_when_their_colour_survives_its_view(runs: dict) -> None:
    """The control: the same loop, scenes and answers, the squares plain instead of checked. The pad model learns
    them, so its chance score on the checks comes from what its 32-px view lost, not from a loop it cannot learn
    in."""
    assert runs["pad_solid"]["accuracy"] >= MIN_ANYRES, runs["summary"]
    assert runs["pad_solid"]["accuracy"] - runs["pad"]["accuracy"] >= MIN_GAP, runs["summary"]


def test_the_exported_anyres_model_answers_in_transformers_as_in_vitune(runs: dict, tmp_path) -> None:
    """vitune's trained anyres model → model folder → llava-hf export; transformers alone (the exported folder's
    LlavaNextForConditionalGeneration and processor) answers the held-out questions within 0.05 of vitune."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vitune.model.export import export_llava_hf
    from vitune.model.folder import save_model_folder

    trained, tower = runs["anyres"]["model"], runs["anyres"]["tower"]
    cfg = ModelConfig(vision=VisionConfig(image_aspect_ratio="anyres", image_grid_pinpoints=LLAVA_16_GRID_PX))
    tokenizer = load_tokenizer("tiny")
    save_model_folder(trained, tokenizer, cfg, tower.fingerprint(), str(tmp_path / "vitune"))
    out = export_llava_hf(str(tmp_path / "vitune"), str(tmp_path / "hf"))
    hf = AutoModelForImageTextToText.from_pretrained(out).eval()
    assert type(hf).__name__ == "LlavaNextForConditionalGeneration"
    processor = AutoProcessor.from_pretrained(out)
    right = []
    for scene, rec in synthetic.detail_examples(SEED, NUM_TRAIN, NUM_EVAL)["eval"]:
        question = rec["conversations"][0]["value"].replace(IMAGE_TOKEN, "").strip()
        messages = [{"role": "user", "content": [{"type": "image", "image": scene.render()},
                                                 {"type": "text", "text": question}]}]
        inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                               return_dict=True, return_tensors="pt")
        with torch.no_grad():
            ids = hf.generate(**inputs, max_new_tokens=8, do_sample=False)[0, inputs["input_ids"].shape[1]:]
        right.append(processor.decode(ids, skip_special_tokens=True).strip() == rec["answer"])
    hf_accuracy, ours = sum(right) / len(right), runs["anyres"]["accuracy"]
    print(f"held-out detail accuracy: vitune {ours:.3f}, transformers on the llava-hf export {hf_accuracy:.3f}")
    assert abs(hf_accuracy - ours) <= MAX_EXPORT_GAP, (hf_accuracy, ours)
