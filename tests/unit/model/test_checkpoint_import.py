"""Import of public LLaVA layouts: tiny fixtures of each layout are built here, load, and keep their weights.

Layouts: a llava-hf folder (a vitune export, and transformers' own `save_pretrained` of one), an official LLaVA
folder (`LlavaLlamaForCausalLM`: `model.mm_projector.*`, `mm_*` config keys, a pickled `pytorch_model.bin`)
and a stage-1 `mm_projector.bin`. Export → import → export is bit-identical; a checkpoint of other features is
refused naming the fingerprint field; pickles are read with `weights_only=True`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from vitune.config import ModelConfig, VisionConfig
from vitune.data.tokenizer import load_tokenizer
from vitune.model.export import EXPORT_META, export_llava_hf
from vitune.model.folder import load_model_folder, save_model_folder
from vitune.model.importers import (
    CheckpointMismatch,
    detect_layout,
    ensure_model_folder,
    import_checkpoint,
    load_tensors,
)
from vitune.model.vision import load_vision_tower
from vitune.model.vlm import build_model


def _tiny(projector: str) -> tuple[Any, Any, ModelConfig, Any]:
    tokenizer = load_tokenizer("tiny")
    cfg = ModelConfig(projector=projector, vision=VisionConfig())
    tower = load_vision_tower(cfg.vision)
    model = build_model(cfg, tokenizer, tower.hidden_size).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.2, generator=gen)
    return model, tokenizer, cfg, tower


@pytest.fixture(scope="module", params=["linear", "mlp2x_gelu"])
def source(request, tmp_path_factory) -> dict[str, Any]:
    """A randomised tiny vitune model, its folder and its llava-hf export."""
    tmp = tmp_path_factory.mktemp(f"import-{request.param}")
    model, tokenizer, cfg, tower = _tiny(request.param)
    save_model_folder(model, tokenizer, cfg, tower.fingerprint(), str(tmp / "vitune"))
    export_llava_hf(str(tmp / "vitune"), str(tmp / "hf"))
    return {"tmp": tmp, "model": model, "tokenizer": tokenizer, "cfg": cfg, "tower": tower, "hf": tmp / "hf"}


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_export_import_export_is_bit_identical(source: dict, tmp_path: Path) -> None:
    imported = import_checkpoint(str(source["hf"]), str(tmp_path / "vitune"))
    model, _, meta = load_model_folder(imported)
    assert _same_weights(model, source["model"])
    assert meta["model"] == source["cfg"].model_dump(mode="json")
    again = export_llava_hf(imported, str(tmp_path / "hf"))
    first, second = _files(source["hf"]), _files(Path(again))
    assert first.keys() == second.keys() and EXPORT_META in first
    assert [name for name in first if first[name] != second[name]] == []


def test_transformers_saved_llava_hf_folder_imports(source: dict, tmp_path: Path) -> None:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    public = tmp_path / "public"  # what transformers itself writes, without vitune's metadata
    LlavaForConditionalGeneration.from_pretrained(str(source["hf"])).save_pretrained(str(public))
    AutoProcessor.from_pretrained(str(source["hf"])).save_pretrained(str(public))
    assert detect_layout(public) == "llava-hf" and not (public / EXPORT_META).exists()
    imported = import_checkpoint(str(public), str(tmp_path / "vitune"), source["cfg"])
    model, _, meta = load_model_folder(imported)
    assert _same_weights(model.lm, source["model"].lm)
    assert _same_weights(model.projector, source["model"].projector)
    assert meta["extra"]["layout"] == "llava-hf" and meta["projector"]["name"] == source["cfg"].projector


def _official_fixture(source: dict, folder: Path, drop_rows: int = 0, **config_overrides: Any) -> Path:
    """The official LLaVA layout of the source model: one LlavaLlamaForCausalLM pickle + tokenizer.

    `drop_rows` leaves the last vocabulary rows out, as LLaVA's LM lacks the `<image>` row vitune adds.
    """
    model, tower = source["model"], source["tower"]
    folder.mkdir(parents=True)
    state = {k: v.clone() for k, v in model.lm.state_dict().items()}
    vocab = model.lm.config.vocab_size - drop_rows
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        state[key] = state[key][:vocab].clone()
    state.update({f"model.mm_projector.{k}": v.clone() for k, v in model.projector.state_dict().items()})
    hf_tower = load_file(str(source["hf"] / "model.safetensors"))
    prefix = "vision_tower.vision_model."
    state.update({"model.vision_tower.vision_tower.vision_model." + k[len(prefix):]: v
                  for k, v in hf_tower.items() if k.startswith(prefix)})
    torch.save(state, folder / "pytorch_model.bin")
    config = {**model.lm.config.to_diff_dict(), "vocab_size": vocab, "architectures": ["LlavaLlamaForCausalLM"],
              "model_type": "llava_llama", "mm_vision_tower": "vitune-tiny-vit", "mm_hidden_size": tower.hidden_size,
              "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
              "mm_projector_type": source["cfg"].projector, "image_aspect_ratio": "pad",
              "mm_use_im_start_end": False, "mm_use_im_patch_token": False, "tune_mm_mlp_adapter": False,
              **config_overrides}
    (folder / "config.json").write_text(json.dumps(config))
    source["tokenizer"].save_pretrained(str(folder))
    return folder


def test_official_llava_folder_imports(source: dict, tmp_path: Path) -> None:
    folder = _official_fixture(source, tmp_path / "official")
    assert detect_layout(folder) == "llava"
    imported = import_checkpoint(str(folder), str(tmp_path / "vitune"), source["cfg"])
    model, _, meta = load_model_folder(imported)
    assert _same_weights(model.lm, source["model"].lm)
    assert _same_weights(model.projector, source["model"].projector)
    assert meta["lm"]["included"] and meta["fingerprint"]["tower"] == "vitune-tiny-vit"


def test_official_lm_grows_rows_for_new_tokens(source: dict, tmp_path: Path) -> None:
    folder = _official_fixture(source, tmp_path / "official", drop_rows=2)
    model, _, _ = load_model_folder(import_checkpoint(str(folder), str(tmp_path / "vitune"), source["cfg"]))
    original = source["model"].lm.get_input_embeddings().weight
    grown = model.lm.get_input_embeddings().weight
    assert grown.shape == original.shape
    assert torch.equal(grown[:-2], original[:-2])
    torch.testing.assert_close(grown[-2:], original[:-2].mean(dim=0).expand(2, -1))


def test_identity_projector_round_trips(tmp_path: Path) -> None:
    tokenizer = load_tokenizer("tiny")
    cfg = ModelConfig(projector="identity")  # the tiny tower and LM are both 64 wide
    tower = load_vision_tower(cfg.vision)
    save_model_folder(build_model(cfg, tokenizer, tower.hidden_size), tokenizer, cfg, tower.fingerprint(),
                      str(tmp_path / "vitune"))
    first = export_llava_hf(str(tmp_path / "vitune"), str(tmp_path / "hf"))
    imported = import_checkpoint(first, str(tmp_path / "imported"))
    assert load_model_folder(imported)[2]["projector"]["name"] == "identity"
    second = export_llava_hf(imported, str(tmp_path / "hf2"))
    assert _files(Path(first)) == _files(Path(second))


def test_stage1_projector_imports_with_the_configured_lm(source: dict, tmp_path: Path) -> None:
    projector = {f"model.mm_projector.{k}": v.clone() for k, v in source["model"].projector.state_dict().items()}
    torch.save(projector, tmp_path / "mm_projector.bin")
    assert detect_layout(tmp_path / "mm_projector.bin") == "mm_projector"
    imported = import_checkpoint(str(tmp_path / "mm_projector.bin"), str(tmp_path / "vitune"), source["cfg"])
    model, _, meta = load_model_folder(imported)
    assert _same_weights(model.projector, source["model"].projector)
    assert not meta["lm"]["included"] and meta["lm"]["source"] == "tiny"


def test_wrong_tower_is_refused_naming_the_field(source: dict, tmp_path: Path) -> None:
    expected = source["tower"].fingerprint()
    for field, other in (("feature_layer", -1), ("select", "cls_patch"), ("image_mode", "crop")):
        with pytest.raises(CheckpointMismatch, match=rf"\({field} differ\)") as info:
            import_checkpoint(str(source["hf"]), str(tmp_path / field), fingerprint={**expected, field: other})
        assert [d[0] for d in info.value.diffs] == [field]
    official = _official_fixture(source, tmp_path / "official", mm_vision_tower="openai/clip-vit-large-patch14-336")
    with pytest.raises(CheckpointMismatch, match=r"tower: checkpoint 'ViT-L-14-336', expected 'vitune-tiny-vit'"):
        import_checkpoint(str(official), str(tmp_path / "official-vitune"), source["cfg"])
    (tmp_path / "stage1").mkdir()
    shutil.copy(official / "config.json", tmp_path / "stage1" / "config.json")
    torch.save({f"model.mm_projector.{k}": v for k, v in source["model"].projector.state_dict().items()},
               tmp_path / "stage1" / "mm_projector.bin")
    with pytest.raises(CheckpointMismatch, match=r"\(tower, pretrained differ\)"):
        import_checkpoint(str(tmp_path / "stage1"), str(tmp_path / "stage1-vitune"), source["cfg"])


def test_other_tower_weights_are_refused(source: dict, tmp_path: Path) -> None:
    altered = tmp_path / "altered"
    shutil.copytree(source["hf"], altered)
    os.remove(altered / EXPORT_META)  # a public checkpoint: only the weights say which tower it is
    weights = load_file(str(altered / "model.safetensors"))
    weights["vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"] += 0.5
    save_file(weights, str(altered / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointMismatch, match=r"tower: checkpoint 'other vision weights"):
        import_checkpoint(str(altered), str(tmp_path / "vitune"), source["cfg"])


def test_other_projector_is_refused(source: dict, tmp_path: Path) -> None:
    other = "mlp2x_gelu" if source["cfg"].projector == "linear" else "linear"
    cfg = source["cfg"].model_copy(update={"projector": other})
    with pytest.raises(CheckpointMismatch, match=rf"projector: checkpoint '{source['cfg'].projector}'"):
        import_checkpoint(str(source["hf"]), str(tmp_path / "vitune"), cfg)


def test_ensure_model_folder_imports_and_passes_vitune_folders(source: dict, tmp_path: Path) -> None:
    vitune_folder = str(source["tmp"] / "vitune")
    assert ensure_model_folder(vitune_folder, source["cfg"], None, str(tmp_path)) == vitune_folder
    folder = ensure_model_folder(str(source["hf"]), source["cfg"], None, str(tmp_path / "imported"))
    assert folder.startswith(str(tmp_path / "imported"))
    model, _, _ = load_model_folder(folder)
    assert _same_weights(model, source["model"])


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pickles_are_loaded_without_running_code(tmp_path: Path) -> None:
    torch.save({"model.mm_projector.weight": _RunsCode()}, tmp_path / "mm_projector.bin")
    with pytest.raises(Exception, match="Weights only load failed"):
        load_tensors(tmp_path / "mm_projector.bin")
