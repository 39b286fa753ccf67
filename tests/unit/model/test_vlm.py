"""Projector registry, the `<image>` splice, loss, stage freezing and the model folder (decoding: test_decoding)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vitune.config import ModelConfig
from vitune.data.tokenizer import load_tokenizer
from vitune.model.folder import META_FILE, inference_dtype, load_for_inference, load_model_folder, save_model_folder
from vitune.model.projector import build_projector, parse_projector_name
from vitune.model.vision import load_vision_tower
from vitune.model.vlm import IGNORE_INDEX, VisionLanguageModel, build_model, splice_image_features

DV, N = 12, 5  # vision width and patches per image in these tests


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny")


def peaky_model(tokenizer) -> VisionLanguageModel:
    """The tiny VLM with peakier weights than the 0.02 init: fewer near-ties in greedy decoding, larger logits."""
    vlm = build_model(ModelConfig(), tokenizer, DV).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in vlm.parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.3, generator=gen)
    return vlm


@pytest.fixture(scope="module")
def model(tokenizer) -> VisionLanguageModel:
    return peaky_model(tokenizer)


def _features(count: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, N, DV, generator=torch.Generator().manual_seed(seed))


# -- projector ----------------------------------------------------------------------------------


def test_projector_registry() -> None:
    assert isinstance(build_projector("linear", 8, 16), nn.Linear)
    mlp = build_projector("mlp2x_gelu", 8, 16)
    assert [type(m).__name__ for m in mlp] == ["Linear", "GELU", "Linear"]
    assert (mlp[0].in_features, mlp[0].out_features, mlp[2].in_features, mlp[2].out_features) == (8, 16, 16, 16)
    assert sorted(mlp.state_dict()) == ["0.bias", "0.weight", "2.bias", "2.weight"]  # LLaVA's mm_projector keys
    assert sum(isinstance(m, nn.Linear) for m in build_projector("mlp3x_gelu", 8, 16)) == 3
    assert isinstance(build_projector("identity", 8, 8), nn.Identity)
    assert parse_projector_name("mlp12x_gelu").depth == 12


@pytest.mark.parametrize("name", ["mlp", "mlpx_gelu", "mlp0x_gelu", "mlp2x_relu", "MLP2x_gelu", "mlp-2x_gelu", "conv"])
def test_projector_unknown_name_lists_valid(name: str) -> None:
    with pytest.raises(ValueError, match=r"unknown projector .*linear, identity, mlp<N>x_gelu"):
        build_projector(name, 8, 8)


def test_identity_projector_needs_equal_widths() -> None:
    with pytest.raises(ValueError, match="equal widths"):
        build_projector("identity", 8, 16)


# -- splice -------------------------------------------------------------------------------------


class _IdEmbedding(nn.Module):
    """Embeds token t as [t, t] so the spliced sequence shows which token landed where."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return ids.float()[..., None].expand(*ids.shape, 2)


IMG = 9


def _image_embeds(count: int, n: int) -> torch.Tensor:
    # image i, patch j → value 100 * (i + 1) + j
    values = torch.tensor([[100.0 * (i + 1) + j for j in range(n)] for i in range(count)])
    return values[..., None].expand(count, n, 2)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_splice_layout(padding_side: str) -> None:
    ids = torch.tensor([[1, 5, IMG, 6, 0], [1, 7, 0, 0, 0], [1, IMG, 8, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]])
    labels = torch.where(mask.bool(), ids + 50, torch.full_like(ids, IGNORE_INDEX))
    out = splice_image_features(
        ids, mask, _IdEmbedding(), IMG, _image_embeds(2, 3), labels, padding_side, pad_token_id=0
    )
    rows = [
        [1, 5, 100, 101, 102, 6],
        [1, 7],
        [1, 200, 201, 202, 8],
    ]
    label_rows = [[51, 55, -100, -100, -100, 56], [51, 57], [51, -100, -100, -100, 58]]
    image_rows = [[0, 0, 1, 1, 1, 0], [0, 0], [0, 1, 1, 1, 0]]
    width = 6
    assert out.inputs_embeds.shape == (3, width, 2)
    for b, (row, lab, img) in enumerate(zip(rows, label_rows, image_rows, strict=True)):
        pad = width - len(row)
        sl = slice(pad, width) if padding_side == "left" else slice(0, len(row))
        expected_mask = [0] * pad + [1] * len(row) if padding_side == "left" else [1] * len(row) + [0] * pad
        assert out.inputs_embeds[b, sl, 0].tolist() == row
        assert out.labels[b, sl].tolist() == lab
        assert out.image_mask[b, sl].long().tolist() == img
        assert out.attention_mask[b].tolist() == expected_mask
        assert out.position_ids[b, sl].tolist() == list(range(len(row)))
        assert (out.labels[b][torch.tensor(expected_mask) == 0] == IGNORE_INDEX).all()


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_splice_several_images_in_a_sample_in_reading_order(padding_side: str) -> None:
    # sample 0 holds two images (2 and 3 tokens), sample 1 none, sample 2 one (1 token)
    ids = torch.tensor([[1, IMG, 5, IMG, 6], [1, 7, 0, 0, 0], [IMG, 8, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 0, 0, 0]])
    embeds = [_image_embeds(1, 2)[0], _image_embeds(2, 3)[1], _image_embeds(3, 1)[2]]
    out = splice_image_features(ids, mask, _IdEmbedding(), IMG, embeds, padding_side=padding_side)
    rows = [[1, 100, 101, 5, 200, 201, 202, 6], [1, 7], [300, 8]]
    width = 8
    assert out.inputs_embeds.shape == (3, width, 2)
    for b, row in enumerate(rows):
        sl = slice(width - len(row), width) if padding_side == "left" else slice(0, len(row))
        assert out.inputs_embeds[b, sl, 0].tolist() == row
        assert out.image_mask[b].sum().item() == [5, 0, 1][b]


def test_splice_rejects_feature_count_mismatch() -> None:
    ids = torch.tensor([[1, IMG], [1, 2]])
    with pytest.raises(ValueError, match="1 <image> tokens but 2 image feature"):
        splice_image_features(ids, None, _IdEmbedding(), IMG, _image_embeds(2, 3))
    with pytest.raises(ValueError, match="1 <image> tokens but 0"):
        splice_image_features(ids, None, _IdEmbedding(), IMG, None)


def test_splice_ignores_image_token_in_padding() -> None:
    ids = torch.tensor([[1, 2, IMG]])
    out = splice_image_features(ids, torch.tensor([[1, 1, 0]]), _IdEmbedding(), IMG, None)
    assert out.inputs_embeds.shape[1] == 2


# -- forward: mixed batches and loss ------------------------------------------------------------


def test_mixed_batch_equals_each_sample_alone(model: VisionLanguageModel) -> None:
    img = model.image_token_id
    samples = [[1, 300, img, 301, 302], [1, 310, 311, 312, 313, 314, 315, 316], [1, img, 320]]
    features = _features(2)
    width = max(map(len, samples))
    ids = torch.tensor([s + [model.pad_token_id] * (width - len(s)) for s in samples])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in samples])
    with torch.no_grad():
        batched = model(ids, mask, image_features=features)
        alone = [
            model(torch.tensor([samples[0]]), image_features=features[:1]),
            model(torch.tensor([samples[1]])),
            model(torch.tensor([samples[2]]), image_features=features[1:]),
        ]
    for row, single in enumerate(alone):
        length = single.logits.shape[1]
        assert int(batched.attention_mask[row].sum()) == length
        torch.testing.assert_close(batched.logits[row, :length], single.logits[0], rtol=1e-5, atol=1e-5)


def test_loss_is_mean_ce_over_trained_positions(model: VisionLanguageModel) -> None:
    img = model.image_token_id
    ids = torch.tensor([[1, 300, img, 301, 302, 303], [1, 305, 306, 307, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    labels = torch.tensor([[-100, -100, -100, 301, 302, 303], [-100, -100, 306, 307, -100, -100]])
    out = model(ids, mask, labels, _features(1))
    assert out.labels.shape == (2, 6 + N - 1)
    assert (out.labels[0, 2 : 2 + N] == IGNORE_INDEX).all()  # image positions never train
    assert out.labels[0, 2 + N :].tolist() == [301, 302, 303]
    # manual: each trained label predicted from the logits one position before it
    terms = []
    for b in range(2):
        for t in range(1, out.labels.shape[1]):
            if out.labels[b, t] != IGNORE_INDEX:
                terms.append(F.cross_entropy(out.logits[b, t - 1][None].float(), out.labels[b, t][None]))
    assert out.num_label_tokens == len(terms) == 5
    torch.testing.assert_close(out.loss, torch.stack(terms).mean())
    out.loss.backward()
    assert model.projector[0].weight.grad is not None and model.projector[0].weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)


def test_loss_without_trained_tokens_is_zero(model: VisionLanguageModel) -> None:
    ids = torch.tensor([[1, 300, 301]])
    out = model(ids, labels=torch.full_like(ids, IGNORE_INDEX))
    assert out.num_label_tokens == 0 and float(out.loss.detach()) == 0.0


def test_build_model_is_deterministic(tokenizer) -> None:
    a, b = build_model(ModelConfig(), tokenizer, DV), build_model(ModelConfig(), tokenizer, DV)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    assert a.lm.config.vocab_size == len(tokenizer)
    assert a.lm.config.hidden_size == 64 and a.lm.config.num_hidden_layers == 2
    assert a.image_token_id == tokenizer.convert_tokens_to_ids("<image>")


# -- freezing -----------------------------------------------------------------------------------


def test_freeze_for_stage(tokenizer, caplog: pytest.LogCaptureFixture) -> None:
    vlm = build_model(ModelConfig(), tokenizer, DV)
    projector_params = sum(p.numel() for p in vlm.projector.parameters())
    lm_params = sum(p.numel() for p in vlm.lm.parameters())
    with caplog.at_level(logging.INFO, logger="vitune.model.vlm"):
        counts = vlm.freeze_for_stage("align")
    trainable = {name for name, p in vlm.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith("projector.") for name in trainable)
    assert counts == {
        "projector": {"trainable": projector_params, "frozen": 0},
        "lm": {"trainable": 0, "frozen": lm_params},
    }
    assert "lm frozen" in caplog.text and "projector trains" in caplog.text

    counts = vlm.freeze_for_stage("finetune")
    assert all(p.requires_grad for p in vlm.parameters())
    assert counts["lm"] == {"trainable": lm_params, "frozen": 0}
    with pytest.raises(ValueError, match="valid stages: align, finetune"):
        vlm.freeze_for_stage("pretrain")


# -- model folder -------------------------------------------------------------------------------


@pytest.mark.parametrize("include_lm", [True, False])
def test_model_folder_round_trip(tokenizer, tmp_path: Path, include_lm: bool) -> None:
    cfg = ModelConfig()
    vlm = build_model(cfg, tokenizer, DV).eval()
    with torch.no_grad():
        vlm.projector[0].weight.mul_(3.0)  # "trained" projector; the LM stays as built when not saved
        if include_lm:
            vlm.lm.lm_head.weight.add_(0.5)
    fingerprint = {"tower": "vitune-tiny-vit", "feature_layer": -2}
    uri = str(tmp_path / "model")
    save_model_folder(vlm, tokenizer, cfg, fingerprint, uri, include_lm=include_lm, extra={"stage": "align"})
    assert (tmp_path / "model" / "lm").exists() == include_lm

    loaded, tok, meta = load_model_folder(uri)
    assert meta["fingerprint"] == fingerprint and meta["extra"] == {"stage": "align"}
    assert meta["image_token_id"] == loaded.image_token_id == vlm.image_token_id
    assert loaded.eos_token_ids == vlm.eos_token_ids and loaded.pad_token_id == vlm.pad_token_id
    assert tok.convert_tokens_to_ids("<image>") == vlm.image_token_id and len(tok) == len(tokenizer)
    ids = torch.tensor([[1, 300, vlm.image_token_id, 301, 302]])
    with torch.no_grad():
        before = vlm(ids, image_features=_features(1)).logits
        after = loaded(ids, image_features=_features(1)).logits
    assert torch.equal(before, after)


def test_model_folder_rejects_unknown_format(tokenizer, tmp_path: Path) -> None:
    import json

    vlm = build_model(ModelConfig(), tokenizer, DV)
    save_model_folder(vlm, tokenizer, ModelConfig(), {}, str(tmp_path), include_lm=False)
    meta = json.loads((tmp_path / META_FILE).read_text())
    (tmp_path / META_FILE).write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(ValueError, match="format version 99"):
        load_model_folder(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not a vitune model folder"):
        load_model_folder(str(tmp_path / "missing"))


def test_load_for_inference_checks_the_tower_and_uses_fp32_on_cpu(tokenizer, tmp_path: Path) -> None:
    cfg = ModelConfig()
    tower = load_vision_tower(cfg.vision)
    vlm = build_model(cfg, tokenizer, tower.hidden_size).to(torch.bfloat16)
    save_model_folder(vlm, tokenizer, cfg, tower.fingerprint(), str(tmp_path / "ok"), include_lm=True)
    loaded = load_for_inference(str(tmp_path / "ok"), device="cpu")
    assert loaded.model.dtype == torch.float32 and loaded.tower.fingerprint() == tower.fingerprint()
    assert loaded.meta["dtype"] == "bfloat16" and loaded.tower.dtype == torch.float32
    assert inference_dtype("auto", "cuda", loaded.meta) == torch.bfloat16
    assert load_for_inference(str(tmp_path / "ok"), device="cpu", dtype="bfloat16").model.dtype == torch.bfloat16
    other = {**tower.fingerprint(), "feature_layer": -1}
    save_model_folder(vlm, tokenizer, cfg, other, str(tmp_path / "other"), include_lm=False)
    with pytest.raises(ValueError, match="feature_layer: trained on -1, tower gives -2"):
        load_for_inference(str(tmp_path / "other"), device="cpu")
