"""LoRA / QLoRA (vitune.model.lora): target modules, what trains, the folder round trip, merge parity and export,
the projector's own optimizer group, and the config refusals that name the option."""

from __future__ import annotations

import json
import logging
import sys

import pytest
import torch
from transformers import LlavaForConditionalGeneration

from vitune.cli.merge import merge_model_folder
from vitune.config import ConfigError, LoraConfig, ModelConfig, TrainJobConfig, build_config
from vitune.data.tokenizer import load_tokenizer
from vitune.model import lora
from vitune.model.export import export_llava_hf
from vitune.model.folder import load_model_folder, read_meta, save_model_folder
from vitune.model.vision import load_vision_tower
from vitune.model.vlm import build_model
from vitune.train.driver import _check_runnable
from vitune.train.plan import param_groups

# merged W + s·B·A against W x + s·B(A x) in fp32: the sums differ only in rounding order
MERGE_ATOL = 1e-4
LINEARS = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny")


@pytest.fixture(scope="module")
def tower():
    return load_vision_tower(ModelConfig().vision)


def _lora_model(tokenizer, tower, settings: LoraConfig | None = None, seed: int = 1):
    """The tiny VLM with adapters whose B is non-zero (a fresh B is zero: the adapter would change nothing)."""
    model = build_model(ModelConfig(), tokenizer, tower.hidden_size)
    model.freeze_for_stage("align")
    model.lm = lora.apply_lora(model.lm, settings or LoraConfig(enabled=True, r=4, alpha=8), base_name="tiny")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.lm.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.eval()


def _batch(tokenizer, tower):
    ids = tokenizer("<image>\nWhat shape is this?", return_tensors="pt").input_ids
    feats = torch.randn(1, tower.num_patches, tower.hidden_size, generator=torch.Generator().manual_seed(3))
    return ids, feats


def _logits(model, ids, feats) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, image_features=feats).logits


def _save(model, tokenizer, tower, path) -> str:
    lm_state = {k: v for k, v in model.lm.state_dict().items() if "lora_" in k}
    meta = {"base_digest": lora.base_digest(lora.base_parameters(model.lm)), "base_dtype": "float32",
            "quantization": "none"}
    return save_model_folder(model, tokenizer, ModelConfig(), tower.fingerprint(), str(path), include_lm=False,
                             adapter=(lambda d: lora.save_adapter(model.lm, lm_state, d), meta))


def test_targets_every_linear_of_the_lm_but_its_head(tokenizer, tower):
    model = build_model(ModelConfig(), tokenizer, tower.hidden_size)
    assert lora.lora_target_modules(model.lm) == LINEARS
    wrapped = lora.apply_lora(model.lm, LoraConfig(enabled=True, r=4, alpha=8))
    trainable = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    adapted = {n.split(".")[-4] for n in trainable}
    assert adapted == set(LINEARS)  # every linear of both layers, and not lm_head
    assert not any("lm_head" in n for n in trainable)


def test_folder_round_trip_and_merge_parity(tokenizer, tower, tmp_path):
    model = _lora_model(tokenizer, tower)
    ids, feats = _batch(tokenizer, tower)
    want = _logits(model, ids, feats)
    base = build_model(ModelConfig(), tokenizer, tower.hidden_size).eval()
    assert (want - _logits(base, ids, feats)).abs().max() > 1e-2  # the adapter changes the answer

    folder = _save(model, tokenizer, tower, tmp_path / "lora")
    assert (tmp_path / "lora" / "adapter" / "adapter_model.safetensors").exists()
    assert not (tmp_path / "lora" / "lm").exists()  # the base is named, not copied
    meta = read_meta(folder)
    assert meta["lm"]["adapter"] == "adapter" and meta["lm"]["source"] == "tiny"
    loaded, _, _ = load_model_folder(folder)
    assert lora.is_lora(loaded.lm)
    torch.testing.assert_close(_logits(loaded, ids, feats), want, rtol=0, atol=0)  # base + adapter, as trained

    merged_meta = merge_model_folder(folder, str(tmp_path / "merged"))
    assert merged_meta["lm"]["included"] and "adapter" not in merged_meta["lm"]
    merged, _, _ = load_model_folder(str(tmp_path / "merged"))
    assert not lora.is_lora(merged.lm)
    diff = (_logits(merged, ids, feats) - want).abs().max().item()
    assert diff <= MERGE_ATOL, f"merged vs base+adapter logits differ by {diff}"

    # the merged folder exports to llava-hf, and transformers computes the same logits from it
    out = export_llava_hf(str(tmp_path / "merged"), str(tmp_path / "hf"))
    hf = LlavaForConditionalGeneration.from_pretrained(out).eval()
    assert hf.config.text_config.hidden_size == merged.lm.config.hidden_size
    ours = merged.lm.state_dict()["model.layers.0.self_attn.q_proj.weight"]
    theirs = hf.state_dict()["model.language_model.layers.0.self_attn.q_proj.weight"]
    torch.testing.assert_close(theirs, ours, rtol=0, atol=0)


def test_merge_refuses_a_folder_without_adapter(tokenizer, tower, tmp_path):
    model = build_model(ModelConfig(), tokenizer, tower.hidden_size)
    folder = save_model_folder(model, tokenizer, ModelConfig(), tower.fingerprint(), str(tmp_path / "plain"))
    with pytest.raises(ValueError, match="no LoRA adapter"):
        merge_model_folder(folder, str(tmp_path / "out"))


def test_other_base_weights_warn(tokenizer, tower, tmp_path, caplog):
    model = _lora_model(tokenizer, tower)
    folder = _save(model, tokenizer, tower, tmp_path / "lora")
    meta = read_meta(folder)
    meta["lm"]["base_digest"] = "0" * 64  # as if trained over another base
    (tmp_path / "lora" / "vitune_model.json").write_text(json.dumps(meta))
    with caplog.at_level(logging.WARNING, logger="vitune.model.folder"):
        load_model_folder(folder)
    assert "other base weights" in caplog.text


def test_base_digest_sees_one_changed_bit(tokenizer, tower):
    model = build_model(ModelConfig(), tokenizer, tower.hidden_size)
    before = lora.base_digest(lora.base_parameters(model.lm))
    wrapped = lora.apply_lora(model.lm, LoraConfig(enabled=True, r=2))
    assert lora.base_digest(lora.base_parameters(wrapped)) == before  # plain names under peft's wrapping
    with torch.no_grad():
        w = wrapped.base_model.model.model.layers[1].mlp.down_proj.base_layer.weight
        w.view(torch.int32)[0, 0] ^= 1
    assert lora.base_digest(lora.base_parameters(wrapped)) != before


def test_projector_gets_its_own_learning_rate(tokenizer, tower):
    model = _lora_model(tokenizer, tower).train()
    model.projector.requires_grad_(True)
    groups = param_groups(model, lr=2e-4, projector_lr=2e-5)
    assert [g["lr"] for g in groups] == [2e-4, 2e-5]
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in model.projector.parameters()}
    assert all(p.requires_grad for g in groups for p in g["params"])
    full = build_model(ModelConfig(), tokenizer, tower.hidden_size)
    full.freeze_for_stage("finetune")
    assert [g["lr"] for g in param_groups(full, lr=2e-5, projector_lr=None)] == [2e-5, 2e-5]
    summary = lora.trainable_summary(model)
    assert 0 < summary["trainable_share"] < 0.5 and summary["trainable_params"] < summary["total_params"]


def _train_cfg(*overrides: str) -> TrainJobConfig:
    return build_config(TrainJobConfig, {}, ["stage=finetune", "train.lora.enabled=true", *overrides])


def test_config_refusals_name_the_option(monkeypatch):
    assert _train_cfg().train.lora.r == 64
    with pytest.raises(ConfigError, match="train.lora.enabled"):
        build_config(TrainJobConfig, {}, ["stage=align", "train.lora.enabled=true"])
    with pytest.raises(ConfigError, match=r"train\.lora\.quantization='nf4'.*ZeRO-3"):
        _train_cfg("train.lora.quantization=nf4", "train.zero_stage=3")
    # whether bitsandbytes is there is the job's machine's question, asked when the job starts (not at
    # validation: `vitune submit` validates on a laptop for a GPU cluster)
    cfg = _train_cfg("train.lora.quantization=nf4", "train.zero_stage=2")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as on a machine without the qlora extra
    with pytest.raises(ValueError, match=r"train\.lora\.quantization='nf4'.*bitsandbytes is not installed"):
        _check_runnable(cfg)


def test_qlora_trains_adapters_over_a_4bit_base(tokenizer, tower):
    pytest.importorskip("bitsandbytes", reason="the qlora extra (make installs it)")
    cfg = _train_cfg("train.lora.quantization=nf4", "train.zero_stage=2", "train.lora.r=4")
    model = build_model(ModelConfig(), tokenizer, tower.hidden_size)
    model.freeze_for_stage("align")
    model.lm = lora.apply_lora(lora.quantize_lm(model.lm, "cpu"), cfg.train.lora)
    layer = model.lm.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert type(layer).__name__ == "Linear4bit" and layer.weight.dtype == torch.uint8
    assert layer.weight.quant_state.quant_type == "nf4"
    ids, feats = _batch(tokenizer, tower)
    opt = torch.optim.AdamW(param_groups(model, 1e-2, None))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    packed = layer.weight.detach().clone()
    for _ in range(2):
        loss = model(input_ids=ids, labels=ids, image_features=feats).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert torch.isfinite(loss)
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert any("lora_B" in n for n in changed) and any(n.startswith("projector") for n in changed)
    assert torch.equal(layer.weight, packed)  # the 4-bit base stays as it was


def test_two_adapters_over_one_base_each_answer_as_their_folder(tokenizer, tower, tmp_path):
    from vitune.config import ServeConfig
    from vitune.serve.adapters import engine_for, load_engines

    folders = {name: _save(_lora_model(tokenizer, tower, seed=seed), tokenizer, tower, tmp_path / name)
               for name, seed in (("a", 1), ("b", 2))}
    ids, feats = _batch(tokenizer, tower)
    alone = {name: _logits(load_model_folder(f)[0], ids, feats) for name, f in folders.items()}
    assert (alone["a"] - alone["b"]).abs().max() > 1e-2  # the two adapters answer differently
    engines = load_engines(ServeConfig(model=folders["a"], served_model_name="a", adapters={"b": folders["b"]},
                                       device="cpu", warmup=False))
    try:
        assert list(engines) == ["a", "b"]
        assert engines["a"].model.lm.peft_lm is engines["b"].model.lm.peft_lm  # one base in memory
        for name in ("a", "b", "a", "b"):  # switching back and forth
            torch.testing.assert_close(_logits(engine_for(engines, name).model, ids, feats), alone[name],
                                       rtol=0, atol=1e-6)
        assert engine_for(engines, None) is engines["a"]
    finally:
        for engine in engines.values():
            engine.close()


def test_adapter_over_another_base_is_refused(tokenizer, tower, tmp_path):
    from vitune.config import ServeConfig
    from vitune.serve.adapters import load_engines

    a = _save(_lora_model(tokenizer, tower), tokenizer, tower, tmp_path / "a")
    b = _save(_lora_model(tokenizer, tower, seed=2), tokenizer, tower, tmp_path / "b")
    meta = read_meta(b)
    meta["lm"]["base_digest"] = "f" * 64
    (tmp_path / "b" / "vitune_model.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="adapters.other: trained over base"):
        load_engines(ServeConfig(model=a, adapters={"other": b}, device="cpu", warmup=False))
