"""Public LLaVA checkpoints in: llava-hf folders, official LLaVA folders and stage-1 projectors → vitune folders.

`import_checkpoint(source, out_uri, model_cfg)` writes a vitune model folder from
- a llava-hf folder (`LlavaForConditionalGeneration`, the layout of `llava-hf/llava-1.5-7b-hf`, or a vitune
  export, whose `vitune_export.json` makes the round trip bit for bit); `LlavaNextForConditionalGeneration` /
  `LlavaOnevisionForConditionalGeneration` (llava-hf/llava-v1.6-*) import as an anyres model whose recipe carries
  the checkpoint's grid (and anyres_max_N cap) and whose `image_newline` is the checkpoint's;
- an official LLaVA folder (`LlavaLlamaForCausalLM`: `model.mm_projector.*` weights, `mm_*` config keys), and the
  LLaVA-NeXT / OneVision layout of the same code line (lmms-lab/llava-onevision-qwen2-*: `LlavaQwenForCausalLM`,
  `image_aspect_ratio` anyres / anyres_max_N, `model.image_newline`, a SigLIP tower under
  `model.vision_tower.vision_tower.vision_model.` without its last block and head) as an anyres model;
- a stage-1 `mm_projector.bin` (LLaVA's `pretrain_mm_mlp_adapter`), with the LM named by `model_cfg.lm`.
`ensure_model_folder` is the hook for `train.init_from`: a vitune folder passes through, any other layout
is imported into a folder named by a hash of its URI (under a work prefix on storage, so every worker reads it).

Every import checks the checkpoint's feature fingerprint fields (tower, layer, CLS handling, image mode,
width) against the expected ones and refuses naming the field that differs; tower weights, when the
checkpoint holds them, must be the configured open_clip tower's. Tensors load with safetensors where
present, else `torch.load(..., weights_only=True)`: a checkpoint cannot run code.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from vitune import storage
from vitune.config import ModelConfig
from vitune.data.tokenizer import load_tokenizer
from vitune.model import llava_hf, llava_next_hf, llava_official, tower_hf
from vitune.model.export import EXPORT_META
from vitune.model.folder import META_FILE, save_model_folder
from vitune.model.vision import load_vision_tower
from vitune.model.vlm import VisionLanguageModel, build_model
from vitune.vision_recipe import VERSION_FIELDS, VisionRecipe, parse_grid_pinpoints

logger = logging.getLogger(__name__)

LAYOUTS = ("vitune", "llava-hf", "llava", "mm_projector")
PROJECTOR_FILE = "mm_projector.bin"
class CheckpointMismatch(ValueError):
    """A checkpoint that does not fit the expected features or model config; names each field that differs."""

    def __init__(self, source: str, diffs: list[tuple[str, Any, Any]]):
        self.source, self.diffs = source, diffs
        detail = "; ".join(f"{field}: checkpoint {have!r}, expected {want!r}" for field, want, have in diffs)
        super().__init__(f"checkpoint {source} does not fit ({', '.join(d[0] for d in diffs)} differ): {detail}")


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """One weights file: safetensors, or a PyTorch pickle read with `weights_only=True` (no code runs)."""
    if path.suffix == ".safetensors":
        return load_file(str(path))
    return torch.load(str(path), map_location="cpu", weights_only=True)


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All weights of a checkpoint folder (sharded or not), safetensors preferred over pickles."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index_name).exists():
            files = sorted(set(json.loads((folder / index_name).read_text())["weight_map"].values()))
            break
    else:
        files = [p.name for p in sorted(folder.glob("*.safetensors"))]
        files = files or [p.name for p in sorted(folder.glob("pytorch_model*.bin"))]
    if not files:
        raise FileNotFoundError(f"{folder} holds no model weights (*.safetensors or pytorch_model*.bin)")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        tensors.update(load_tensors(folder / name))
    return tensors


def detect_layout(path: Path) -> str:
    """Which of `LAYOUTS` a local file or folder is; a clear error for anything else."""
    if path.is_file():
        return "mm_projector"
    if (path / META_FILE).exists():
        return "vitune"
    config = json.loads((path / "config.json").read_text()) if (path / "config.json").exists() else {}
    archs = config.get("architectures") or []
    has_lm = any(path.glob("*.safetensors")) or any(path.glob("pytorch_model*.bin"))
    if (path / PROJECTOR_FILE).exists() and not has_lm:
        return "mm_projector"
    # official LLaVA v1 configs say model_type "llava" too: the architecture tells them apart
    if any(arch in llava_official.LLAVA_ARCHS for arch in archs) or any(key.startswith("mm_") for key in config):
        return "llava"
    hf_types = {"llava": "LlavaForConditionalGeneration", **llava_next_hf.MODEL_TYPES}
    if config.get("model_type") in hf_types or any(arch in hf_types.values() for arch in archs):
        return "llava-hf"
    raise ValueError(f"{path} is no known checkpoint layout: not a vitune folder ({META_FILE}), a llava-hf folder "
                     "(config model_type 'llava', 'llava_next' or 'llava_onevision'), an official LLaVA folder "
                     f"(mm_* config keys) or a {PROJECTOR_FILE}")


def check_fields(found: dict[str, Any], expected: dict[str, Any], source: str) -> None:
    """Refuse a checkpoint whose known fingerprint fields differ from the expected ones, naming them."""
    diffs = [(field, expected[field], value) for field, value in found.items()
             if field in expected and field not in VERSION_FIELDS and expected[field] != value]
    if diffs:
        raise CheckpointMismatch(source, diffs)


def check_tower_weights(tensors: dict[str, torch.Tensor], tower: Any, source: str) -> None:
    """The checkpoint's tower weights (canonical llava-hf names) must be the configured tower's."""
    problem = tower_hf.check_tower_weights(tensors, tower)
    if problem is not None:
        raise CheckpointMismatch(source, [("tower", f"{tower.name} ({tower.pretrained})", problem)])


def _check_projector(name: str, model_cfg: ModelConfig, source: str) -> None:
    if name != model_cfg.projector:
        raise CheckpointMismatch(source, [("projector", model_cfg.projector, name)])


def _grow_vocab(lm_state: dict[str, torch.Tensor], text_config: dict[str, Any], size: int) -> None:
    """Add rows for tokens the tokenizer gained (`<image>`): the mean row, so the result is deterministic."""
    vocab = lm_state["model.embed_tokens.weight"].shape[0]  # the config may leave a default vocab_size out
    if size <= vocab:
        return
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        if key in lm_state:
            weight = lm_state[key]  # [V, D]
            extra = weight.float().mean(dim=0, keepdim=True).to(weight.dtype).expand(size - vocab, -1)
            lm_state[key] = torch.cat([weight, extra])
    text_config["vocab_size"] = size
    logger.info("grew the LM vocabulary from %d to %d tokens (new rows: the mean embedding)", vocab, size)


def _build_lm(text_config: dict[str, Any], lm_state: dict[str, torch.Tensor]) -> nn.Module:
    """A causal LM from a config dict and its state dict (`model.*`, `lm_head.*`), weights as given."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig  # deferred: heavy, import paths only

    fields = dict(text_config)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    dtype = next(iter(lm_state.values())).dtype
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    lm, info = model_class.from_pretrained(None, config=config, state_dict=lm_state, dtype=dtype,
                                           output_loading_info=True)
    missing = [k for k in info["missing_keys"] if not k.startswith("lm_head.") or not config.tie_word_embeddings]
    if missing or info["unexpected_keys"]:
        raise ValueError(f"LM weights do not fit {model_class.__name__}: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(info['unexpected_keys'])[:5]}")
    return lm.eval()


def _assemble(model_cfg: ModelConfig, tokenizer: Any, tower: Any, lm: nn.Module | None,
              projector_state: dict[str, torch.Tensor], ids: dict[str, Any] | None,
              newline: torch.Tensor | None = None) -> VisionLanguageModel:
    """The vitune model: the LM (or `model_cfg.lm` when None), the projector weights, the token ids; an anyres
    tower's recipe with the checkpoint's row `newline`."""
    recipe = tower.recipe if tower.recipe.image_mode == "anyres" else None
    model = build_model(model_cfg, tokenizer, tower.hidden_size, lm=lm, recipe=recipe)
    model.projector.load_state_dict(projector_state)
    if ids is not None:  # a vitune export: the ids it was trained with, not today's defaults
        model = VisionLanguageModel(model.projector, model.lm, ids["image_token_id"], ids["pad_token_id"],
                                    ids["stop_token_ids"], recipe=recipe)
    if (model.image_newline is None) != (newline is None):
        kind = recipe.patch_merge if recipe else tower.image_mode
        raise ValueError(f"the checkpoint {'has' if newline is not None else 'lacks'} an image newline, which a "
                         f"{kind} model {'lacks' if newline is not None else 'needs'}")
    if newline is not None:
        with torch.no_grad():
            model.image_newline.copy_(newline)
    return model.eval()


def _next_vision(model_cfg: ModelConfig, config: dict[str, Any], source: str) -> ModelConfig:
    """`model_cfg` with the aspect fields of a LLaVA-NeXT / OneVision config (its grid, its anyres_max_N cap);
    a config that names anyres with another grid is refused."""
    tile = int((config.get("vision_config") or {}).get("image_size", VisionRecipe.of(model_cfg.vision).image_size))
    fields = llava_next_hf.recipe_fields(config, tile)
    vision = model_cfg.vision
    if vision.image_mode == "anyres":
        diffs = [(name, want, fields[name]) for name, want in (
            ("image_aspect_ratio", vision.image_aspect_ratio), ("mm_patch_merge_type", vision.mm_patch_merge_type),
            ("image_grid_pinpoints", [list(p) for p in parse_grid_pinpoints(vision.image_grid_pinpoints, tile)]))
            if want != fields[name]]
        if diffs:
            raise CheckpointMismatch(source, diffs)
    update = {**vision.model_dump(), **fields}
    return model_cfg.model_copy(update={"vision": type(vision).model_validate(update)})


def _note_image_mode(mode: str | None, expected: dict[str, Any], source: str) -> None:
    # A public llava-hf processor says how transformers serves the model, not how it was trained:
    # llava-hf/llava-1.5-*-hf crop, although LLaVA-1.5 trained on padded images. So this is no refusal.
    if mode is not None and mode != expected.get("image_mode"):
        logger.warning("%s: its processor config %ss images, the expected features %s them; importing anyway "
                       "(a public processor config need not be the training preprocessing)", source, mode,
                       expected.get("image_mode"))


def _import_llava_hf(path: Path, model_cfg: ModelConfig | None, expected: dict | None, source: str):
    config = json.loads((path / "config.json").read_text())
    processor_file = next((path / n for n in ("processor_config.json", "preprocessor_config.json")
                           if (path / n).exists()), None)
    processor = json.loads(processor_file.read_text()) if processor_file else None
    export = json.loads((path / EXPORT_META).read_text()) if (path / EXPORT_META).exists() else None
    if model_cfg is None:
        if export is None:
            raise ValueError(f"{source} is not a vitune export: name the model config (template, vision) to import it")
        model_cfg = ModelConfig.model_validate(export["model"])
    anyres = config.get("model_type") in llava_next_hf.MODEL_TYPES
    if anyres and export is None:  # the checkpoint's grid and cap make the recipe
        model_cfg = _next_vision(model_cfg, config, source)
    tower = load_vision_tower(model_cfg.vision)
    expected = expected or tower.fingerprint()
    found = tower_hf.feature_fields(config)
    if anyres:
        found.update(image_mode="anyres", grid_pinpoints=[list(p) for p in config["image_grid_pinpoints"]])
    if export is not None:
        found.update({k: export["fingerprint"][k] for k in ("tower", "pretrained", "image_mode")})
    elif not anyres:
        _note_image_mode(llava_hf.processor_image_mode(processor), expected, source)
    check_fields(found, expected, source)
    tensors = llava_hf.canonical_names(read_weights(path))
    newline = llava_next_hf.pop_newline(tensors) if anyres else None
    lm_state, tower_state, projector_tensors = llava_hf.split(tensors)
    if tower_state:
        check_tower_weights(tower_state, tower, source)
    name, projector_state = llava_hf.projector_from_tensors(
        projector_tensors, config.get("projector_hidden_act", "gelu"), config.get("multimodal_projector_bias", True),
        name=export["projector"] if export else None)
    _check_projector(name, model_cfg, source)
    tokenizer = load_tokenizer(str(path))
    if export is not None:
        tokenizer.chat_template = export["tokenizer_chat_template"]  # the model's own, not the exported Jinja
    text_config = dict(config["text_config"])
    _grow_vocab(lm_state, text_config, len(tokenizer))
    lm = _build_lm(text_config, lm_state)
    model = _assemble(model_cfg, tokenizer, tower, lm, projector_state, export, newline)
    return model, tokenizer, model_cfg, export["fingerprint"] if export else tower.fingerprint(), True


def _official_lm(config: dict[str, Any], tensors: dict[str, torch.Tensor], tokenizer: Any) -> nn.Module:
    arch = (config.get("architectures") or [""])[0]
    if arch not in llava_official.LLAVA_ARCHS:
        raise ValueError(f"official LLaVA architecture {arch!r} is not one of {list(llava_official.LLAVA_ARCHS)}")
    text_config = {k: v for k, v in config.items()
                   if not k.startswith("mm_") and k not in llava_official.LLAVA_ONLY_KEYS}
    text_config["model_type"] = llava_official.LLAVA_ARCHS[arch]
    not_lm = ("model.mm_projector.", "model.vision_tower.")
    lm_state = {k: v for k, v in tensors.items() if k.startswith(("model.", "lm_head.")) and not k.startswith(not_lm)}
    _grow_vocab(lm_state, text_config, len(tokenizer))
    return _build_lm(text_config, lm_state)


def _import_official(path: Path, model_cfg: ModelConfig, expected: dict | None, source: str):
    config = json.loads((path / "config.json").read_text())
    tile = VisionRecipe.of(model_cfg.vision).image_size
    anyres = llava_official.official_anyres(config, tile)
    if anyres is not None:  # LLaVA-NeXT / OneVision: the checkpoint's grid and cap make the recipe
        model_cfg = _next_vision(model_cfg, anyres, source)
    tower = load_vision_tower(model_cfg.vision)
    check_fields(llava_official.official_fields(config, tile), expected or tower.fingerprint(), source)
    tensors = read_weights(path)
    newline = llava_next_hf.pop_newline(tensors) if anyres is not None else None
    tower_state = llava_hf.canonical_names(llava_official.official_tower_state(tensors))
    if tower_state:
        check_tower_weights(tower_state, tower, source)
    name, state = llava_official.projector_state(tensors)
    _check_projector(name, model_cfg, source)
    tokenizer = load_tokenizer(str(path))
    lm = _official_lm(config, tensors, tokenizer)
    model = _assemble(model_cfg, tokenizer, tower, lm, state, None, newline)
    return model, tokenizer, model_cfg, tower.fingerprint(), True


def _import_projector(path: Path, model_cfg: ModelConfig, expected: dict | None, source: str):
    file = path if path.is_file() else path / PROJECTOR_FILE
    tower = load_vision_tower(model_cfg.vision)
    expected = expected or tower.fingerprint()
    sibling = file.parent / "config.json"  # LLaVA's stage-1 output folder keeps its config beside the weights
    if sibling.exists():
        check_fields(llava_official.official_fields(json.loads(sibling.read_text())), expected, source)
    name, state = llava_official.projector_state(load_tensors(file))
    _check_projector(name, model_cfg, source)
    first = state["weight"] if "weight" in state else state["0.weight"]  # [Dl, Dv]
    check_fields({"hidden_size": first.shape[1]}, {"hidden_size": tower.hidden_size}, source)
    tokenizer = load_tokenizer(model_cfg.tokenizer or model_cfg.lm)
    model = _assemble(model_cfg, tokenizer, tower, None, state, None)
    return model, tokenizer, model_cfg, tower.fingerprint(), False


_IMPORTERS = {"llava-hf": _import_llava_hf, "llava": _import_official, "mm_projector": _import_projector}


def import_checkpoint(
    source: str, out_uri: str, model_cfg: ModelConfig | None = None, fingerprint: dict[str, Any] | None = None
) -> str:
    """Write the vitune model folder of checkpoint `source` (local or s3://) to `out_uri`; returns `out_uri`.

    `model_cfg` is the preset's model section (template, projector, vision tower; for a stage-1 projector
    also the LM); a vitune export brings its own. `fingerprint` is what the checkpoint must match (the
    feature store's); by default the fingerprint of `model_cfg.vision`'s tower.
    """
    with tempfile.TemporaryDirectory(prefix="vitune-import-") as tmp:
        local = storage.local_path(source)
        if local is None:
            name = source.rstrip("/").rsplit("/", 1)[-1]
            path = Path(tmp) / name
            if name.endswith((".bin", ".pt", ".safetensors")):
                path.write_bytes(storage.read_bytes(source))
            else:
                storage.download_dir(source, path)
        else:
            path = Path(local)
        layout = detect_layout(path)
        if layout == "vitune":
            raise ValueError(f"{source} is already a vitune model folder")
        if model_cfg is None and layout != "llava-hf":
            raise ValueError(f"importing a {layout} checkpoint needs the model config (template, vision, projector)")
        model, tokenizer, model_cfg, fp, include_lm = _IMPORTERS[layout](path, model_cfg, fingerprint, source)
        save_model_folder(model, tokenizer, model_cfg, fp, out_uri, include_lm=include_lm,
                          extra={"imported_from": source, "layout": layout})
    logger.info("imported %s (%s, projector %s) as vitune model folder %s", source, layout, model_cfg.projector,
                out_uri)
    return out_uri


def ensure_model_folder(
    source: str, model_cfg: ModelConfig, fingerprint: dict[str, Any] | None, work_uri: str
) -> str:
    """`source` when it is a vitune model folder, else its import under `work_uri/<hash of source>`."""
    if storage.exists(storage.join(source, META_FILE)):
        return source
    out = storage.join(work_uri, hashlib.sha256(source.encode()).hexdigest()[:12])
    return import_checkpoint(source, out, model_cfg, fingerprint)
