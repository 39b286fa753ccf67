"""Import of LLaVA-OneVision checkpoints: the lmms-lab layout (official LLaVA-NeXT code) and llava-hf's.

The fixture: a tiny random SigLIP + Qwen2 anyres_max_9 vitune model (tests/unit/model/test_export_siglip.py) is
exported to llava-hf, where transformers' `LlavaOnevisionForConditionalGeneration` loads it (the reference). From
that folder's weights the test writes the lmms-lab layout as LLaVA-VL/LLaVA-NeXT saves it
(lmms-lab/llava-onevision-qwen2-0.5b-ov): config.json with `LlavaQwenForCausalLM`, the Qwen2 fields and the `mm_*` /
`image_aspect_ratio` / `image_grid_pinpoints` keys; weights `model.layers.*`, `model.embed_tokens`,
`model.mm_projector.{0,2}`, `model.image_newline` and the SigLIP tower under
`model.vision_tower.vision_tower.vision_model.` without its last block and MAP head (siglip_encoder.py deletes
them); a tokenizer without `<image>` (the official code splices at index -200). The import must give logits equal
to transformers' on three odd aspect ratios (over the checkpoint's vocabulary: vitune adds `<image>`'s row).
The llava-hf export itself imports back bit for bit. A flat merge or a foreign tower is refused, naming why.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.unit.data.real_tokenizers import chatml_tokenizer
from tests.unit.model.test_export_siglip import TOWER, Exported, _export, _hf_inputs, _image
from vitune.config import ModelConfig, VisionConfig
from vitune.data.masks import tokenize_generation_prompt
from vitune.model import llava_hf
from vitune.model.folder import load_model_folder
from vitune.model.importers import CheckpointMismatch, detect_layout, import_checkpoint
from vitune.model.vision import encode_image_tiles, load_vision_tower

LOGITS_ATOL = 1e-4
SIZES = [(10, 200), (333, 77), (400, 300)]  # (width, height)
_TOWER = "vision_tower.vision_model."
_OFFICIAL_TOWER = "model.vision_tower.vision_tower.vision_model."


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Exported:
    return _export(tmp_path_factory.mktemp("ov-export"), "onevision")


def _lmms_weights(hf: dict[str, torch.Tensor], num_layers: int, vocab: int) -> dict[str, torch.Tensor]:
    """llava-hf names → LLaVA-NeXT's; the tower without its last block and head; the LM without `<image>`'s row."""
    out = {}
    for key, tensor in hf.items():
        if key.startswith("language_model."):
            name = key[len("language_model."):]  # model.layers.*, model.embed_tokens, lm_head
            out[name] = tensor[:vocab].clone() if name in ("model.embed_tokens.weight", "lm_head.weight") else tensor
        elif key.startswith("multi_modal_projector."):
            layer = {"linear_1": "0", "linear_2": "2"}[key.split(".")[1]]
            out[f"model.mm_projector.{layer}.{key.split('.')[2]}"] = tensor
        elif key.startswith(_TOWER):
            rest = key[len(_TOWER):]
            if rest.startswith((f"encoder.layers.{num_layers - 1}.", "head.")):
                continue  # siglip_encoder.py: del encoder.layers[-1:], head = nn.Identity()
            out[_OFFICIAL_TOWER + rest] = tensor
        elif key == "image_newline":
            out["model.image_newline"] = tensor
        else:
            raise AssertionError(f"unexpected export weight {key}")
    return out


def _write_lmms(ex: Exported, folder: Path, tokenizer=None, **overrides) -> Path:
    folder.mkdir(parents=True)
    config = json.loads((ex.out / "config.json").read_text())
    tokenizer = tokenizer or chatml_tokenizer(image_token=False)
    tokenizer.save_pretrained(str(folder))
    vocab = len(tokenizer)
    text = {k: v for k, v in config["text_config"].items() if k not in ("architectures", "dtype")}
    recipe = ex.model.recipe
    save_file(_lmms_weights(load_file(str(ex.out / "model.safetensors")), ex.tower.num_layers, vocab),
              str(folder / "model.safetensors"))
    official = {**text, "architectures": ["LlavaQwenForCausalLM"], "model_type": "llava", "vocab_size": vocab,
                "mm_vision_tower": TOWER, "mm_projector_type": "mlp2x_gelu", "mm_hidden_size": ex.tower.hidden_size,
                "mm_vision_select_layer": ex.tower.feature_layer, "mm_vision_select_feature": "patch",
                "mm_patch_merge_type": "spatial_unpad", "image_aspect_ratio": "anyres_max_9",
                "image_grid_pinpoints": [list(p) for p in recipe.grid_pinpoints], "mm_use_im_start_end": False,
                "mm_use_im_patch_token": False, "mm_newline_position": "grid", "mm_spatial_pool_mode": "bilinear",
                "mm_tunable_parts": "mm_vision_tower,mm_mlp_adapter,mm_language_model",
                "tokenizer_model_max_length": 32768, "tokenizer_padding_side": "right", "use_mm_proj": True,
                **overrides}
    (folder / "config.json").write_text(json.dumps(official, indent=2))
    return folder


def _model_cfg() -> ModelConfig:
    # what a user names for lmms-lab/llava-onevision-qwen2-*: the tower, projector and template; the grid and cap
    # come from the checkpoint
    return ModelConfig(vision=VisionConfig(name=TOWER), projector="mlp2x_gelu", template="qwen_1_5")


def _logits(model, tower, tokenizer, template: str, image) -> tuple[list[int], torch.Tensor]:
    ids = tokenize_generation_prompt([{"from": "human", "value": "<image>\nWhat is in the picture?"}], template,
                                     tokenizer)
    with torch.no_grad():
        logits = model(torch.tensor([ids]), image_features=encode_image_tiles(tower, [image]),
                       image_sizes=[image.size]).logits[0]
    return ids, logits


@pytest.fixture(scope="module")
def imported(exported, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ov-lmms")
    source = _write_lmms(exported, tmp / "llava-onevision-qwen2-tiny-ov")
    assert detect_layout(source) == "llava"
    out = import_checkpoint(str(source), str(tmp / "vitune"), _model_cfg())
    model, tokenizer, meta = load_model_folder(out)
    tower = load_vision_tower(VisionConfig.model_validate(meta["model"]["vision"]))
    return model.eval(), tokenizer, meta, tower


def test_the_lmms_lab_layout_imports_as_a_capped_anyres_model(exported, imported) -> None:
    model, _, meta, tower = imported
    assert meta["model"]["vision"]["image_aspect_ratio"] == "anyres_max_9"
    assert model.recipe == exported.model.recipe
    assert tower.fingerprint()["grid_pinpoints"] == [list(p) for p in exported.model.recipe.grid_pinpoints]
    torch.testing.assert_close(model.image_newline, exported.model.image_newline, rtol=0, atol=0)


@pytest.mark.parametrize(("width", "height"), SIZES)
def test_imported_logits_equal_transformers_onevision(exported, imported, width, height) -> None:
    model, tokenizer, meta, tower = imported
    image = _image(width, height)
    inputs = _hf_inputs(exported, image)
    with torch.no_grad():
        expected = exported.hf(**inputs).logits[0]
    ids, got = _logits(model, tower, tokenizer, meta["model"]["template"], image)
    assert ids == _vitune_prompt(exported)  # ChatML, the same ids (<image> appended where the export had it)
    vocab = len(chatml_tokenizer(image_token=False))  # vitune's added <image> row is its own, not the checkpoint's
    assert got.shape == expected.shape
    torch.testing.assert_close(got[:, :vocab], expected[:, :vocab], rtol=1e-5, atol=LOGITS_ATOL)


def _vitune_prompt(ex: Exported) -> list[int]:
    return tokenize_generation_prompt([{"from": "human", "value": "<image>\nWhat is in the picture?"}],
                                      ex.cfg.template, ex.tokenizer)


def test_the_llava_hf_export_imports_back_bit_for_bit(exported, tmp_path) -> None:
    out = import_checkpoint(str(exported.out), str(tmp_path / "back"))
    model, tokenizer, meta = load_model_folder(out)
    want = exported.model.state_dict()
    got = model.state_dict()
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name
    assert meta["fingerprint"]["tower"] == TOWER and meta["model"]["template"] == "qwen_1_5"
    assert tokenizer.get_vocab() == exported.tokenizer.get_vocab()


def test_a_flat_merge_is_refused(exported, tmp_path) -> None:
    source = _write_lmms(exported, tmp_path / "flat", mm_patch_merge_type="flat")
    with pytest.raises(llava_hf.NotRepresentable, match="'flat'.*spatial_unpad"):
        import_checkpoint(str(source), str(tmp_path / "out"), _model_cfg())


def test_other_tower_weights_are_refused(exported, tmp_path) -> None:
    source = _write_lmms(exported, tmp_path / "other")
    weights = load_file(str(source / "model.safetensors"))
    key = _OFFICIAL_TOWER + "encoder.layers.0.mlp.fc1.weight"
    weights[key] = weights[key] + 0.5
    save_file(weights, str(source / "model.safetensors"))
    with pytest.raises(CheckpointMismatch, match="tower.*encoder.layers.0.mlp.fc1"):
        import_checkpoint(str(source), str(tmp_path / "out"), _model_cfg())


def test_an_official_llava_next_clip_folder_imports_too(tmp_path) -> None:
    """LLaVA-1.6's official layout (LlavaLlamaForCausalLM, a CLIP tower, image_aspect_ratio anyres) goes through the
    same import; its logits equal transformers' LlavaNext built from the same weights."""
    from tests.unit.model.test_export_llava_next import KINDS
    from tests.unit.model.test_export_llava_next import _export as export_next

    ex = export_next(tmp_path, "next")
    source = _write_lmms(ex, tmp_path / "llava-v1.6-tiny", tokenizer=ex.tokenizer,
                         architectures=["LlavaLlamaForCausalLM"], mm_vision_tower=ex.tower.name,
                         image_aspect_ratio="anyres", mm_tunable_parts="mm_mlp_adapter,mm_language_model")
    cfg = ModelConfig(vision=VisionConfig(name=ex.tower.name), projector="mlp2x_gelu", template=ex.cfg.template)
    model, tokenizer, meta = load_model_folder(import_checkpoint(str(source), str(tmp_path / "vitune"), cfg))
    assert meta["model"]["vision"]["image_aspect_ratio"] == "anyres" and model.recipe == ex.model.recipe
    assert KINDS["next"].image_grid_pinpoints == meta["model"]["vision"]["image_grid_pinpoints"]
    tower = load_vision_tower(VisionConfig.model_validate(meta["model"]["vision"]))
    image = _image(333, 77)
    with torch.no_grad():
        expected = ex.hf(**_hf_inputs(ex, image)).logits[0]
    _, got = _logits(model.eval(), tower, tokenizer, meta["model"]["template"], image)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=LOGITS_ATOL)
