"""AnyRes in the model: tiles and their pixels (against transformers' PIL image processors), feature packing
by hand-laid markers, the variable-count splice, the image newline (init, freezing, model folder) and decoding
rows of different sizes. Logit parity with transformers' LlavaNext / LlavaOnevision: test_parity_anyres."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.unit.model.test_vlm import IMG, _IdEmbedding
from vitune.config import ModelConfig, VisionConfig
from vitune.data.tokenizer import load_tokenizer
from vitune.model.anyres import pack_image_features
from vitune.model.decoding import DecodeBatch, DecodeRow
from vitune.model.export import write_llava_hf
from vitune.model.folder import load_for_inference, load_model_folder, save_model_folder
from vitune.model.image import anyres_views, preprocess, preprocess_tiles
from vitune.model.vision import encode_image_tiles, encode_images, load_vision_tower
from vitune.model.vlm import VisionLanguageModel, build_model, splice_image_features
from vitune.vision_recipe import VisionRecipe, parse_grid_pinpoints, tiles_for, visual_tokens

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
LLAVA_16_PX = [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]  # LLaVA-1.6's grid at 32-px tiles, (h, w)
ODD_SIZES = [(1, 1), (10, 200), (200, 10), (40, 30), (33, 8), (400, 300), (333, 77), (97, 31), (32, 32)]


def _recipe(pinpoints=LLAVA_16_PX, image_size=32, patch=8, **kw) -> VisionRecipe:
    return VisionRecipe(tower="vitune-tiny-vit", pretrained=None, feature_layer=-2, select="patch",
                        image_mode="anyres", image_size=image_size, patch_size=patch, hidden_size=64,
                        grid_pinpoints=parse_grid_pinpoints(pinpoints, image_size), **kw)


def _image(width: int, height: int) -> Image.Image:
    rng = np.random.default_rng(width * 1000 + height)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny")


# -- tiles: geometry and pixels ------------------------------------------------------------------


@pytest.mark.parametrize("onevision", [False, True], ids=["llava-next", "onevision-max9"])
def test_tile_pixels_equal_transformers_pil_image_processor(onevision: bool) -> None:
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    recipe = _recipe("(1x1),...,(6x6)", max_tiles=9) if onevision else _recipe()
    pins = [list(p) for p in recipe.grid_pinpoints]
    if onevision:
        processor = LlavaOnevisionImageProcessorPil(image_grid_pinpoints=pins, size={"height": 32, "width": 32},
                                                    image_mean=MEAN, image_std=STD)
    else:  # the settings a llava-hf LLaVA-NeXT export writes: shortest edge + crop of the tile size, bicubic
        processor = LlavaNextImageProcessorPil(image_grid_pinpoints=pins, size={"shortest_edge": 32}, resample=3,
                                               crop_size={"height": 32, "width": 32}, image_mean=MEAN, image_std=STD)
    for width, height in ODD_SIZES:
        image = _image(width, height)
        ours = preprocess_tiles(image, recipe, MEAN, STD)  # [T, 3, 32, 32]
        theirs = torch.from_numpy(np.asarray(processor(images=image, return_tensors="np")["pixel_values"][0]))
        assert ours.shape == theirs.shape == (tiles_for(recipe, width, height), 3, 32, 32), (width, height)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_tiles_are_the_base_view_then_the_grid_row_by_row() -> None:
    # 64 x 32 (w x h) picks the 1 x 2 grid (64 wide): no resize, no padding; left half red, right half blue
    image = Image.new("RGB", (64, 32), (255, 0, 0))
    image.paste(Image.new("RGB", (32, 32), (0, 0, 255)), (32, 0))
    base, left, right = anyres_views(image, _recipe())
    assert base.size == left.size == right.size == (32, 32)
    assert left.getpixel((5, 5)) == (255, 0, 0) and right.getpixel((5, 5)) == (0, 0, 255)
    assert base.getpixel((2, 16)) == (255, 0, 0) and base.getpixel((29, 16)) == (0, 0, 255)  # squeezed whole
    # 64 x 16 fits the 1 x 2 grid at its full width, centred between black bands 8 px high
    _, top_left, _ = anyres_views(Image.new("RGB", (64, 16), (0, 255, 0)), _recipe())
    assert top_left.getpixel((3, 3)) == (0, 0, 0) and top_left.getpixel((3, 16)) == (0, 255, 0)
    assert top_left.getpixel((3, 28)) == (0, 0, 0)


def test_pad_and_crop_towers_make_one_tile_and_anyres_towers_refuse_one_square() -> None:
    pad = load_vision_tower(VisionConfig())
    image = _image(40, 30)
    torch.testing.assert_close(preprocess_tiles(image, pad.recipe, pad.mean, pad.std),
                               preprocess(image, 32, pad.mean, pad.std, "pad")[None], rtol=0, atol=0)
    (feats,) = encode_image_tiles(pad, [image])
    assert torch.equal(feats, encode_images(pad, [image]))  # [1, N, D]: the one-tile path is the old one
    anyres = load_vision_tower(VisionConfig(), recipe=_recipe())
    assert anyres.recipe.image_mode == "anyres" and anyres.fingerprint()["grid_pinpoints"] == LLAVA_16_PX
    tiles = encode_image_tiles(anyres, [image, _image(10, 200)])
    assert [t.shape for t in tiles] == [(3, 16, 64), (4, 16, 64)]
    with pytest.raises(ValueError, match="use preprocess_tiles"):
        encode_images(anyres, [image])
    with pytest.raises(ValueError, match="image_size: tower 32, recipe 64"):
        load_vision_tower(VisionConfig(), recipe=_recipe(image_size=64, patch=16))
    with pytest.raises(ValueError, match="not a multiple of the tile size 32"):
        anyres_views(image, _recipe([[32, 48]]))


# -- packing ------------------------------------------------------------------------------------


def _markers(tiles: int, g: int) -> torch.Tensor:
    """Tile features `[T, g*g, 1]` whose value says where they came from: 1000 * tile + patch."""
    return (1000.0 * torch.arange(tiles)[:, None] + torch.arange(g * g)[None, :])[..., None]


def test_spatial_unpad_drops_the_padding_rows_and_ends_each_row_with_the_newline() -> None:
    # tiles of 8 px, patches of 2 (g = 4); one grid of 1 x 2 tiles (8 x 16 px). A 64 x 8 image fills 16 x 2 px
    # of it, centred: feature rows 1 and 2 of the 4 x 8 map hold the image, rows 0 and 3 only padding.
    recipe = _recipe([[8, 16]], image_size=8, patch=2)
    newline = torch.tensor([-1.0])
    packed = pack_image_features(_markers(3, 4), recipe, 64, 8, newline)[:, 0].tolist()
    base = list(range(16))
    rows = [[1000.0 * (1 + c // 4) + r * 4 + c % 4 for c in range(8)] + [-1.0] for r in (1, 2)]
    assert packed == base + rows[0] + rows[1]
    assert len(packed) == visual_tokens(recipe, 64, 8)
    flat = pack_image_features(_markers(3, 4), dataclasses.replace(recipe, patch_merge="flat"), 64, 8)
    assert flat[:, 0].tolist() == _markers(3, 4).flatten().tolist()  # every tile as it is, base first


@pytest.mark.parametrize("merge", ["spatial_unpad", "flat", "max9"])
def test_packed_length_is_the_recipe_count_for_every_size(merge: str) -> None:
    recipe = (_recipe("(1x1),...,(6x6)", max_tiles=9) if merge == "max9"
              else _recipe(patch_merge="flat" if merge == "flat" else "spatial_unpad"))
    newline = torch.zeros(5)
    for width, height in ODD_SIZES + [(2000, 1000), (640, 480)]:
        tiles = torch.randn(tiles_for(recipe, width, height), 16, 5)
        packed = pack_image_features(tiles, recipe, width, height, newline)
        assert packed.shape == (visual_tokens(recipe, width, height), 5)


def test_packing_refuses_tiles_the_recipe_does_not_make() -> None:
    recipe = _recipe()
    with pytest.raises(ValueError, match="makes 5 tiles of 16 features"):
        pack_image_features(torch.zeros(3, 16, 4), recipe, 400, 300, torch.zeros(4))
    with pytest.raises(ValueError, match="needs the model's image_newline"):
        pack_image_features(torch.zeros(5, 16, 4), recipe, 400, 300)


# -- the variable-count splice ------------------------------------------------------------------


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_splice_writes_each_image_its_own_count(padding_side: str) -> None:
    ids = torch.tensor([[1, 5, IMG, 6], [1, 7, 0, 0], [1, IMG, 8, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]])
    embeds = [torch.tensor([[100.0], [101.0]]).expand(2, 2), torch.tensor([[200.0], [201.0], [202.0], [203.0]])
              .expand(4, 2)]
    out = splice_image_features(ids, mask, _IdEmbedding(), IMG, embeds, padding_side=padding_side)
    rows = [[1, 5, 100, 101, 6], [1, 7], [1, 200, 201, 202, 203, 8]]
    for b, row in enumerate(rows):
        got = out.inputs_embeds[b, :, 0][out.attention_mask[b].bool()].tolist()
        assert got == row and out.position_ids[b][out.attention_mask[b].bool()].tolist() == list(range(len(row)))
        if padding_side == "left":
            assert out.attention_mask[b, -1] == 1
    assert out.image_mask.sum() == 6
    with pytest.raises(ValueError, match="each image's must be"):
        splice_image_features(ids, mask, _IdEmbedding(), IMG, [embeds[0], torch.zeros(0, 2)])


def test_a_list_of_equal_counts_splices_as_the_stacked_tensor(tokenizer) -> None:
    model = build_model(ModelConfig(), tokenizer, 12).eval()
    img = model.image_token_id
    ids = torch.tensor([[1, 300, img, 301], [1, img, 310, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    feats = torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        stacked = model(ids, mask, image_features=feats)
        listed = model(ids, mask, image_features=list(feats))  # each [N, Dv]: one tile
    assert torch.equal(stacked.logits, listed.logits)


# -- the model: image newline, freezing, folder, decoding ---------------------------------------


def _anyres_model(tokenizer, recipe: VisionRecipe | None = None) -> VisionLanguageModel:
    return build_model(ModelConfig(), tokenizer, 64, recipe=recipe or _recipe()).eval()


def test_the_image_newline_exists_for_spatial_unpad_only(tokenizer) -> None:
    pad = build_model(ModelConfig(), tokenizer, 64)
    assert pad.image_newline is None and pad.recipe is None
    assert not any("image_newline" in k for k in pad.state_dict())  # pad/crop state dicts are as they were
    assert _anyres_model(tokenizer, _recipe(patch_merge="flat")).image_newline is None
    a, b = _anyres_model(tokenizer), _anyres_model(tokenizer)
    assert a.image_newline.shape == (64,) and torch.equal(a.image_newline, b.image_newline)  # seeded
    assert 0.06 < float(a.image_newline.detach().std()) < 0.2  # LLaVA-NeXT's randn / sqrt(hidden = 64) = 0.125
    with pytest.raises(ValueError, match="list of per-image tile features"):
        a.embed_images(torch.zeros(1, 16, 64))
    with pytest.raises(ValueError, match=r"needs each image's \(width, height\): 1 images, none"):
        a.embed_images([torch.zeros(3, 16, 64)])


def test_the_image_newline_trains_with_the_lm(tokenizer) -> None:
    model = _anyres_model(tokenizer)
    counts = model.freeze_for_stage("align")
    assert not model.image_newline.requires_grad and counts["image_newline"] == {"trainable": 0, "frozen": 64}
    counts = model.freeze_for_stage("finetune")
    assert model.image_newline.requires_grad and counts["image_newline"] == {"trainable": 64, "frozen": 0}


def test_anyres_model_folder_round_trip_and_inference_tower(tokenizer, tmp_path: Path) -> None:
    cfg = ModelConfig()
    tower = load_vision_tower(cfg.vision, recipe=_recipe(max_tiles=4))
    model = build_model(cfg, tokenizer, tower.hidden_size, recipe=tower.recipe).eval()
    with torch.no_grad():
        model.image_newline.mul_(-3.0)  # "trained"
    save_model_folder(model, tokenizer, cfg, tower.fingerprint(), str(tmp_path / "m"), include_lm=True)
    loaded, _, meta = load_model_folder(str(tmp_path / "m"))
    assert loaded.recipe == model.recipe and torch.equal(loaded.image_newline, model.image_newline)
    image = _image(333, 77)
    feats = encode_image_tiles(tower, [image])
    ids = torch.tensor([[1, 300, model.image_token_id, 301]])
    with torch.no_grad():
        assert torch.equal(model(ids, image_features=feats, image_sizes=[image.size]).logits,
                           loaded(ids, image_features=feats, image_sizes=[image.size]).logits)
    served = load_for_inference(str(tmp_path / "m"), device="cpu")
    assert served.tower.recipe == tower.recipe  # the tower cuts the tiles the model was trained on
    pad_meta = load_model_folder(str(_pad_folder(tokenizer, tmp_path)))[2]
    assert "vision_recipe" not in pad_meta and "vision_recipe" in meta
    # never a plain Llava export that drops the tiles: LLaVA-NeXT's class, grid and newline
    write_llava_hf(loaded, tokenizer, meta, served.tower, tmp_path / "hf")
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    kind = "LlavaOnevision" if model.recipe.max_tiles else "LlavaNext"  # anyres_max_N is OneVision's
    assert hf_config["architectures"] == [f"{kind}ForConditionalGeneration"]
    assert hf_config["image_grid_pinpoints"] == [list(p) for p in model.recipe.grid_pinpoints]


def _pad_folder(tokenizer, tmp_path: Path) -> Path:
    model = build_model(ModelConfig(), tokenizer, 64)
    save_model_folder(model, tokenizer, ModelConfig(), {}, str(tmp_path / "pad"), include_lm=False)
    return tmp_path / "pad"


def test_rows_of_other_sizes_join_a_running_batch(tokenizer) -> None:
    model = _anyres_model(tokenizer)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.3, generator=gen)
    tower = load_vision_tower(VisionConfig(), recipe=model.recipe)
    images = [_image(200, 10), _image(40, 30), _image(333, 77)]
    feats = encode_image_tiles(tower, images)
    prompts = [[1, 300, model.image_token_id, 301], [1, model.image_token_id, 310], [1, 320, 321,
                                                                                    model.image_token_id]]
    alone = [model.generate([p], [f], image_sizes=[im.size], max_new_tokens=4, stop_token_ids=[])[0]
             for p, f, im in zip(prompts, feats, images, strict=True)]
    batch = DecodeBatch(model)
    rows = [DecodeRow(p, f, max_new_tokens=4, image_size=im.size, payload=i)
            for i, (p, f, im) in enumerate(zip(prompts, feats, images, strict=True))]
    out: dict[int, list[int]] = {i: [] for i in range(3)}
    batch.join(rows[:1])
    for step in range(6):
        if step == 1:
            batch.join(rows[1:])  # two newcomers of other sizes join the running row
        for row, token in zip(batch.rows, batch.sample().tolist(), strict=True):
            out[row.payload] += row.accept(token, ())
        batch.keep([i for i, row in enumerate(batch.rows) if row.finish_reason is None])
        if not batch.rows:
            break
        batch.step()
    assert [out[i] for i in range(3)] == alone
    # a row without its image's size is taken as the base view alone (detail: low), which one tile must be
    with pytest.raises(ValueError, match="image 1 has no size, so it must be its base view alone"):
        DecodeBatch(model).join([rows[0], DecodeRow(prompts[1], feats[1])])
