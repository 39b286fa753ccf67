"""One count of visual tokens: the recipe's ``visual_tokens`` is what the tower, the feature store, training
data, the serving engine and the llava-hf export all use, for every preset."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

from vitune import storage
from vitune.config import FeaturesJobConfig, VisionConfig, load_config, preset_names
from vitune.data.tokenizer import load_tokenizer
from vitune.features.store import FeatureStore, shard_name, shard_table, write_manifest, write_shard
from vitune.model import llava_hf
from vitune.model.vision import encode_images, load_vision_tower
from vitune.train.data import tokenize_records
from vitune.vision_recipe import VisionRecipe, tiles_for, visual_tokens

SIZES = [(1, 1), (10, 2000), (2000, 10), (4000, 3000), (32, 32), (333, 77), (640, 480)]
# the published geometry of each preset's tower: image side / patch side, squared (LLaVA-1.5: 336 / 14 → 576)
PUBLISHED = {"ViT-L-14-336": 576, "ViT-L-14": 256}


@pytest.mark.parametrize("preset", preset_names())
def test_every_preset_counts_its_tokens_from_the_recipe_of_its_config(preset):
    cfg = load_config(FeaturesJobConfig, preset)
    recipe = VisionRecipe.of(cfg.model.vision)  # read from open_clip's config file: no weights, no torch
    counts = {visual_tokens(recipe, w, h) for w, h in SIZES}
    if recipe.image_mode == "anyres":  # a base view + a grid chosen for the size: the count varies with it
        assert len(counts) > 1 and min(counts) >= recipe.tokens_per_tile  # never less than the base view
        g, side = recipe.grid, 2 * recipe.image_size
        assert tiles_for(recipe, side, side) == 1 + 4
        # a 2x2-tile square: the base view's g*g, then the 2g x 2g grid (nothing to unpad) + a newline per row
        assert visual_tokens(recipe, side, side) == g * g + 2 * g * (2 * g + 1)
        assert visual_tokens(recipe, side, side, base_only=True) == recipe.tokens_per_tile
        if recipe.tower == "ViT-L-14-336":
            assert visual_tokens(recipe, 672, 672) == 2928  # LLaVA-1.6 at 672x672 (its preset's max_length note)
    else:
        assert counts == {recipe.tokens_per_tile}  # pad/crop: one tile whatever the size
    if recipe.tower in PUBLISHED:
        assert recipe.tokens_per_tile == PUBLISHED[recipe.tower]
    # what a store records reads back; the anyres_max_N cap is the model's packing, not the store's (one store serves
    # every cap), so it reads back as no cap
    stored = dataclasses.replace(recipe, max_tiles=None)
    assert VisionRecipe.from_fingerprint(recipe.fingerprint()) == stored


def test_the_tower_gives_as_many_features_as_the_recipe_counts():
    for vision in (VisionConfig(), VisionConfig(select="cls_patch", image_mode="crop")):
        tower = load_vision_tower(vision)
        assert tower.recipe == VisionRecipe.of(vision)
        for w, h in SIZES[:4]:
            feats = encode_images(tower, [Image.new("RGB", (w, h), (200, 10, 10))])  # [1, N, D]
            assert feats.shape[1] == visual_tokens(tower.recipe, w, h)
        # the export's processor expands <image> to the same count
        assert llava_hf.image_seq_length(tower.fingerprint()) == visual_tokens(tower.recipe, 32, 32)


def test_a_bad_size_or_mode_is_refused():
    recipe = VisionRecipe.of(VisionConfig())
    with pytest.raises(ValueError, match="at least 1x1"):
        tiles_for(recipe, 0, 10)
    with pytest.raises(ValueError, match="unknown image mode 'square'; valid: pad, crop, anyres"):
        VisionRecipe(**{**recipe.__dict__, "image_mode": "square"})
    with pytest.raises(ValueError, match="anyres needs image_grid_pinpoints"):
        VisionRecipe(**{**recipe.__dict__, "image_mode": "anyres"})


def test_store_and_training_data_count_each_image_by_its_recorded_size(tmp_path):
    tower = load_vision_tower(VisionConfig())
    fp, n, d = tower.fingerprint(), tower.num_patches, tower.hidden_size
    keys, sizes = ["a.png", "b.png", "c.png"], [[1, 1], [10, 2000], [4000, 3000]]
    out = str(tmp_path / "store")
    feats = np.zeros((len(keys), n, d), np.float16)
    write_shard(storage.join(out, shard_name(0)), shard_table(keys, feats, {"shard": 0, "quarantined": 0}, sizes))
    write_manifest(out, [keys], fp, (n, d))
    store = FeatureStore.open(out)
    assert store.image_sizes() == {k: tuple(s) for k, s in zip(keys, sizes, strict=True)}
    assert store.visual_tokens() == {k: visual_tokens(tower.recipe, *s) for k, s in zip(keys, sizes, strict=True)}

    # training's length limit counts those tokens: a long record keeps max_length - (N - 1) ids
    answer = " ".join(["word"] * 200)
    records = [{"id": k, "image": k, "conversations": [{"from": "human", "value": "<image>\nDescribe."},
                                                       {"from": "gpt", "value": answer}]} for k in keys]
    path = tmp_path / "records.json"
    path.write_text(json.dumps(records))
    max_length = n + 40
    rows = tokenize_records([str(path)], "vicuna_v1", load_tokenizer("tiny"), max_length,
                            image_positions=store.visual_tokens())
    for row in rows:
        assert row.trainable and row.truncated
        assert len(row.input_ids) == max_length - (store.visual_tokens()[row.image_keys[0]] - 1)


# --- AnyRes (LLaVA-NeXT / OneVision geometry) against transformers' own processors, through their public call

LLAVA_16_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]  # llava-v1.6 config.json
ANYRES_SIZES = [(1, 1), (10, 2000), (2000, 10), (4000, 3000), (3000, 4000), (336, 336), (337, 335), (640, 480),
                (480, 640), (1000, 200), (200, 1000), (1024, 1024), (1920, 1080), (50, 60), (6000, 100),
                (100, 6000), (799, 801), (1008, 336)]


def _recipe(image_size: int, patch: int, pinpoints, **kw) -> VisionRecipe:
    from vitune.vision_recipe import parse_grid_pinpoints

    return VisionRecipe(tower="t", pretrained=None, feature_layer=-2, select="patch", image_mode="anyres",
                        image_size=image_size, patch_size=patch, hidden_size=8,
                        grid_pinpoints=parse_grid_pinpoints(pinpoints, image_size), **kw)


def _count(processor, width: int, height: int) -> int:
    out = processor(images=[Image.new("RGB", (width, height), (90, 20, 200))], text=["<image>"], return_tensors="np")
    return int((out["input_ids"] == processor.image_token_id).sum())


def test_anyres_counts_equal_transformers_llava_next_processor():
    from transformers import LlavaNextImageProcessor, LlavaNextProcessor

    images = LlavaNextImageProcessor(image_grid_pinpoints=LLAVA_16_PINPOINTS, size={"shortest_edge": 336},
                                     crop_size={"height": 336, "width": 336})
    processor = LlavaNextProcessor(image_processor=images, tokenizer=load_tokenizer("tiny"), patch_size=14,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1)
    recipe = _recipe(336, 14, LLAVA_16_PINPOINTS)
    counts = {(w, h): visual_tokens(recipe, w, h) for w, h in ANYRES_SIZES}
    assert counts == {(w, h): _count(processor, w, h) for w, h in ANYRES_SIZES}
    assert len(set(counts.values())) > 5  # the count really depends on the size
    # a square image: base + a 1x2 grid (24 x 48 patches) unpadded to 24 x 24, + one newline per row
    assert counts[(336, 336)] == 576 + 24 * 24 + 24


def test_anyres_max_counts_equal_transformers_llava_onevision_processor():
    from transformers import LlavaOnevisionImageProcessor, LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor

    pinpoints = "(1x1),...,(6x6)"  # OneVision's range form, tiles of 384 (SigLIP so400m: 27x27 patches)
    recipe = _recipe(384, 14, pinpoints, max_tiles=9)
    images = LlavaOnevisionImageProcessor(image_grid_pinpoints=[list(p) for p in recipe.grid_pinpoints],
                                          size={"height": 384, "width": 384})
    processor = LlavaOnevisionProcessor(image_processor=images, video_processor=LlavaOnevisionVideoProcessor(),
                                        tokenizer=load_tokenizer("tiny"), num_image_tokens=729,
                                        vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9")
    counts = {(w, h): visual_tokens(recipe, w, h) for w, h in ANYRES_SIZES}
    assert counts == {(w, h): _count(processor, w, h) for w, h in ANYRES_SIZES}
    assert max(counts.values()) < 729 + int(9 * 729 * 1.1 * 1.1) + 27 * 4  # the max_9 cap holds


def test_anyres_tiles_and_flat_merge():
    recipe = _recipe(336, 14, LLAVA_16_PINPOINTS)
    assert tiles_for(recipe, 4000, 3000) == 1 + 4 and tiles_for(recipe, 10, 2000) == 1 + 3
    flat = VisionRecipe(**{**recipe.__dict__, "patch_merge": "flat"})
    assert visual_tokens(flat, 4000, 3000) == 5 * 576  # base + 4 tiles, laid flat without newlines
    assert recipe.fingerprint_id() == flat.fingerprint_id()  # the merge is the model's: the tiles are the same
    other = VisionRecipe(**{**recipe.__dict__, "grid_pinpoints": recipe.grid_pinpoints[:2]})
    assert other.fingerprint_id() != recipe.fingerprint_id()  # another grid, other tiles: another store
    pad = VisionRecipe(**{**recipe.__dict__, "image_mode": "pad", "grid_pinpoints": ()})
    assert "grid_pinpoints" not in pad.fingerprint()  # pad stores keep the fingerprint (and id) they always had


def test_the_config_names_anyres_as_llava_next_does():
    """``image_aspect_ratio`` / ``image_grid_pinpoints`` / ``mm_patch_merge_type`` give the recipe the
    geometry tests above check; the features job and the train job take it."""
    from vitune.config import ConfigError, TrainJobConfig

    onevision = VisionConfig(image_aspect_ratio="anyres_max_9", image_grid_pinpoints="(1x1),...,(3x3)")
    recipe = VisionRecipe.of(onevision)  # the tiny tower: tiles of 32 px
    want = _recipe(32, recipe.patch_size, "(1x1),...,(3x3)", max_tiles=9)
    assert (recipe.grid_pinpoints, recipe.patch_merge, recipe.max_tiles) == (want.grid_pinpoints, "spatial_unpad", 9)
    assert (recipe.image_mode, recipe.max_tiles, len(recipe.grid_pinpoints)) == ("anyres", 9, 9)
    assert recipe.grid_pinpoints[:2] == ((32, 32), (32, 64))
    flat = VisionRecipe.of(VisionConfig(image_aspect_ratio="anyres", image_grid_pinpoints=[[64, 32], [32, 64]],
                                        mm_patch_merge_type="flat"))
    assert (flat.patch_merge, flat.max_tiles, flat.grid_pinpoints) == ("flat", None, ((64, 32), (32, 64)))
    assert visual_tokens(flat, 30, 60) == 3 * flat.tokens_per_tile  # base + a 2x1 grid, laid flat
    assert VisionRecipe.of(onevision).fingerprint_id() != VisionRecipe.of(
        VisionConfig(image_aspect_ratio="anyres_max_9", image_grid_pinpoints="(1x1),...,(2x2)")).fingerprint_id()
    # LLaVA's names and vitune's older ones
    assert VisionConfig(image_aspect_ratio="square").image_mode == VisionConfig(image_mode="crop").image_mode == "crop"
    for bad, says in (({"image_aspect_ratio": "anyres"}, "needs image_grid_pinpoints"),
                      ({"image_aspect_ratio": "anyres_max_0", "image_grid_pinpoints": "(1x1),...,(2x2)"},
                       "expected pad, square"),
                      ({"image_aspect_ratio": "anyres", "image_grid_pinpoints": "2x2"}, "expected a list"),
                      ({"image_grid_pinpoints": [[32, 32]]}, "only read by image_aspect_ratio=anyres"),
                      ({"image_mode": "pad", "image_aspect_ratio": "pad"}, "older name")):
        with pytest.raises(ValueError, match=says):
            VisionConfig(**bad)
    anyres = ["model.vision.image_aspect_ratio=anyres", "model.vision.image_grid_pinpoints=(1x1),...,(2x2)"]
    trained = load_config(TrainJobConfig, "tiny", anyres).model.vision  # the train job takes tiles too
    assert (trained.image_mode, trained.max_tiles) == ("anyres", None)
    capped = load_config(TrainJobConfig, "tiny", [*anyres, "model.vision.image_aspect_ratio=anyres_max_4"])
    assert capped.model.vision.max_tiles == 4
    with pytest.raises(ConfigError, match="needs image_grid_pinpoints"):
        load_config(TrainJobConfig, "tiny", anyres[:1])
    assert load_config(FeaturesJobConfig, "tiny", anyres).model.vision.image_mode == "anyres"
