"""One count of visual tokens: the recipe's ``visual_tokens`` is what the tower, the feature store, training
data, the serving engine and the llava-hf export all use, for every preset."""

from __future__ import annotations

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
    assert counts == {recipe.tokens_per_tile}  # pad/crop: one tile whatever the size
    if recipe.tower in PUBLISHED:
        assert recipe.tokens_per_tile == PUBLISHED[recipe.tower]
    assert VisionRecipe.from_fingerprint(recipe.fingerprint()) == recipe  # what a store records reads back


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
    with pytest.raises(ValueError, match="unknown image mode 'anyres'; valid: pad, crop"):
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
        assert len(row.input_ids) == max_length - (store.visual_tokens()[row.image_key] - 1)
