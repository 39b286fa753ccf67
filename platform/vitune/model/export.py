"""Export a vitune model to the llava-hf layout that transformers, vLLM, SGLang and lmms-eval load.

`export_llava_hf(model_source, out_uri)` takes a model folder URI (`vitune export` resolves `runs:/<run id>`
and `models:/NAME/VERSION` to one first, `vitune.references`) and writes, to a local folder or `s3://` prefix, what
`LlavaForConditionalGeneration.from_pretrained(OUT)` and `AutoProcessor.from_pretrained(OUT)` read with no
vitune installed:

    config.json               LlavaConfig: the LM's text_config, the tower as a CLIPVisionConfig or a
                              SiglipVisionConfig (`vitune.model.tower_hf`), vision_feature_layer /
                              vision_feature_select_strategy from the fingerprint ("full" on SigLIP: no CLS).
                              An anyres model: LlavaNextConfig (LlavaOnevisionConfig with anyres_max_N), the
                              grid, and the `image_newline` weight (`vitune.model.llava_next_hf`)
    model.safetensors         weights (sharded with model.safetensors.index.json when large)
    tokenizer.json, tokenizer_config.json   the tokenizer, `<image>` included
    chat_template.jinja       renders vitune's prompt for the model's conversation template
    processor_config.json     LlavaProcessor + its image processor (pad-to-square or crop, per fingerprint);
                              LlavaNext / LlavaOnevision processor for anyres (tiles as vitune's)
    preprocessor_config.json  the image processor alone (what older loaders read)
    generation_config.json    BOS, pad and the stop tokens vitune's engine stops on
    vitune_export.json        what vitune needs to import the folder back bit for bit (fingerprint, config)

`vitune_export.json` also names the config overrides vLLM needs (`vllm_hf_overrides`: the `linear`
projector's identity activation has another name there). The mapping itself lives in
`vitune.model.llava_hf`. transformers picks its torchvision image backend
when torchvision is installed; its bicubic resize differs from PIL's by up to one intensity level. vitune
resizes with PIL, so `AutoProcessor.from_pretrained(OUT, backend="pil")` gives vitune's pixels exactly.
"""

from __future__ import annotations

import copy
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from vitune import IMAGE_TOKEN, __version__, storage
from vitune.config import VisionConfig
from vitune.data.chat_jinja import chat_template_jinja
from vitune.data.templates import stop_token_ids
from vitune.model import llava_hf, llava_next_hf, tower_hf
from vitune.model.folder import folder_recipe, load_model_folder
from vitune.model.lora import merge_lora
from vitune.model.vision import VisionTower, load_vision_tower
from vitune.model.vlm import VisionLanguageModel
from vitune.vision_recipe import fingerprint_diffs

logger = logging.getLogger(__name__)

FORMATS = ("llava-hf",)
EXPORT_META = "vitune_export.json"
EXPORT_FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
# What vLLM's Llava loader reads from a model folder (besides the weights): the config, the tokenizer, the
# processor configs, the chat template and the generation defaults.
VLLM_READS = ("config.json", "tokenizer.json", "tokenizer_config.json", "processor_config.json",
              "preprocessor_config.json", "chat_template.jinja", "generation_config.json")


def _tower_for(meta: dict[str, Any], model: VisionLanguageModel | None = None) -> VisionTower:
    """The folder's tower (tiling by the folder's anyres recipe): the one its run trained when it holds one (on
    ``model``, as the folder loader attached it), else the pretrained tower; checked to give the model's features."""
    tower = model.vision_tower if model is not None and model.vision_tower is not None else \
        load_vision_tower(VisionConfig.model_validate(meta["model"]["vision"]), recipe=folder_recipe(meta))
    if not meta.get("fingerprint"):
        raise ValueError("the model folder records no feature fingerprint; cannot tell which features it needs")
    diffs = fingerprint_diffs(meta["fingerprint"], tower.fingerprint())
    if diffs:
        detail = "; ".join(f"{field}: trained on {want!r}, tower gives {have!r}" for field, want, have in diffs)
        raise ValueError(f"the model was trained on other features than its tower gives: {detail}")
    return tower


def llava_config(model: VisionLanguageModel, tower: VisionTower, meta: dict[str, Any], act: str,
                 dtype: torch.dtype) -> dict[str, Any]:
    """The `config.json` of the export (validated by building transformers' `LlavaConfig`)."""
    from transformers import LlavaConfig  # deferred: only exporting needs it

    fingerprint = meta["fingerprint"]
    text_config = copy.deepcopy(model.lm.config)
    text_config.architectures = [type(model.lm).__name__]  # vLLM builds the LM from this name
    text_config.dtype = dtype
    recipe = model.recipe
    if recipe is None:
        config_class, arch = LlavaConfig, "LlavaForConditionalGeneration"
        fields = {"image_seq_length": llava_hf.image_seq_length(fingerprint)}
    else:  # anyres: LLaVA-NeXT, or OneVision for an anyres_max_N cap
        config_class, arch = llava_next_hf.config_class(recipe), llava_next_hf.architecture(recipe)
        fields = llava_next_hf.config_fields(recipe)
    config = config_class(
        vision_config=tower_hf.vision_config(tower),
        text_config=text_config,
        image_token_index=meta["image_token_id"],
        **fields,
        projector_hidden_act=act,
        multimodal_projector_bias=True,
        vision_feature_layer=fingerprint["feature_layer"],
        vision_feature_select_strategy=tower_hf.select_strategy(tower, fingerprint["select"]),
        tie_word_embeddings=bool(getattr(model.lm.config, "tie_word_embeddings", False)),
    )
    config.architectures = [arch]
    config.dtype = dtype
    out = config.to_diff_dict()  # what save_pretrained writes: the values that differ from the defaults
    for part in (out, out.get("text_config", {}), out.get("vision_config", {})):
        part.pop("_name_or_path", None)  # where the LM was read from this time; not a fact of the model
    # spelled out even where they equal LlavaConfig's defaults: other loaders may default differently
    for key in ("image_token_index", "projector_hidden_act", "multimodal_projector_bias", "vision_feature_layer",
                "vision_feature_select_strategy", *fields):
        out[key] = getattr(config, key)
    return out


def llava_tensors(model: VisionLanguageModel, tower: VisionTower, projector_name: str,
                  dtype: torch.dtype) -> tuple[str, dict[str, torch.Tensor]]:
    """`(projector_hidden_act, all weights under llava-hf names)` in `dtype`, each tensor its own storage."""
    width = model.lm.get_input_embeddings().embedding_dim
    act, projector = llava_hf.projector_tensors(model.projector, projector_name, width, dtype)
    parts = {**llava_hf.lm_tensors(model.lm), **tower_hf.tower_tensors(tower), **projector}
    if model.recipe is not None:
        parts.update(llava_next_hf.newline_tensors(model.image_newline))
    out, seen = {}, set()
    for name in sorted(parts):
        tensor = parts[name].detach().to(device="cpu", dtype=dtype).contiguous()
        storage_ptr = tensor.untyped_storage().data_ptr()
        if storage_ptr in seen:  # q/k/v are views of one in-projection; safetensors wants separate storage
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        out[name] = tensor
    return act, out


def write_weights(tensors: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int) -> list[str]:
    """Write `tensors` as one safetensors file, or shards + an index when over `max_shard_bytes`."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    metadata = {"format": "pt"}  # transformers refuses safetensors files without it
    if len(shards) == 1:
        save_file(shards[0], str(folder / WEIGHTS_FILE), metadata=metadata)
        return [WEIGHTS_FILE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards, strict=True):
        save_file(shard, str(folder / name), metadata=metadata)
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return [*names, WEIGHTS_INDEX]


def _write_processor(folder: Path, tokenizer: Any, tower: VisionTower, meta: dict[str, Any], jinja: str) -> None:
    """Tokenizer, chat template, processor and image processor configs."""
    from transformers import LlavaProcessor  # deferred: only exporting needs them
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = jinja
    if tower.recipe.image_mode == "anyres":
        processor = llava_next_hf.processor(tower.recipe, tokenizer, tower.patch_size, jinja, tower.mean, tower.std,
                                            strategy=tower_hf.select_strategy(tower, tower.recipe.select),
                                            extra_tokens=tower_hf.additional_tokens(tower))
        processor.save_pretrained(str(folder))
        processor.image_processor.save_pretrained(str(folder))
        return
    image_processor = LlavaImageProcessorPil(
        **llava_hf.image_processor_kwargs(meta["fingerprint"], tower.mean, tower.std))
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=tower.patch_size,
        vision_feature_select_strategy=tower_hf.select_strategy(tower, meta["fingerprint"]["select"]),
        # CLIP's CLS: HF counts it, then drops it under "default"; SigLIP has none to count
        num_additional_image_tokens=tower_hf.additional_tokens(tower),
        chat_template=jinja,
        image_token=IMAGE_TOKEN,
    )
    processor.save_pretrained(str(folder))
    image_processor.save_pretrained(str(folder))


def _write_generation_config(folder: Path, tokenizer: Any, meta: dict[str, Any]) -> None:
    from transformers import GenerationConfig  # deferred: only exporting needs it

    # vLLM / transformers stop on these ids: the model's EOS ids plus the template's turn end where that is not
    # the EOS (<|im_end|>, <|eot_id|>, plain's newline), as vitune's own serving stops (vitune.serve.engine)
    template_stops = stop_token_ids(meta["model"]["template"], tokenizer)
    stops = list(dict.fromkeys([*meta["stop_token_ids"], *template_stops]))
    GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=stops[0] if len(stops) == 1 else stops,
        pad_token_id=meta["pad_token_id"],
    ).save_pretrained(str(folder))


def vllm_hf_overrides(act: str) -> dict[str, Any]:
    """Config overrides vLLM needs for this export (its `hf_overrides`).

    vLLM's activation registry has no `linear` (transformers' identity); recent vLLM maps the dotted name of
    torch's `nn.Identity` to the identity, so a `linear` projector serves with this override.
    """
    return {"projector_hidden_act": "torch.nn.modules.linear.Identity"} if act == "linear" else {}


def export_meta(meta: dict[str, Any], tokenizer: Any, act: str) -> dict[str, Any]:
    """`vitune_export.json`: the vitune facts an export cannot carry in transformers' files."""
    out = {
        "vllm_hf_overrides": vllm_hf_overrides(act),
        "format": "llava-hf",
        "format_version": EXPORT_FORMAT_VERSION,
        "vitune_version": __version__,
        "model": meta["model"],
        "fingerprint": meta["fingerprint"],
        "projector": meta["projector"]["name"],
        "image_token_id": meta["image_token_id"],
        "pad_token_id": meta["pad_token_id"],
        "stop_token_ids": list(meta["stop_token_ids"]),
        # the exported tokenizer carries the Jinja template; the model's own one comes back on import
        "tokenizer_chat_template": tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None,
    }
    if meta.get("vision_recipe"):  # anyres: the grid, merge and cap the model packs its tiles by
        out["vision_recipe"] = meta["vision_recipe"]
    return out


def write_llava_hf(
    model: VisionLanguageModel,
    tokenizer: Any,
    meta: dict[str, Any],
    tower: VisionTower,
    folder: Path,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> list[str]:
    """Write the llava-hf files of a loaded model into the local `folder`; returns the weight files."""
    if model.recipe is not None:  # anyres: LLaVA-NeXT / OneVision, tiles by the same recipe as the tower's
        llava_next_hf.check_recipe(model.recipe)
        if tower.recipe != model.recipe:
            raise ValueError(f"the tower tiles by {tower.recipe}, the model packs by {model.recipe}")
    dtype = dtype or model.dtype
    projector_name = meta["projector"]["name"]
    jinja = chat_template_jinja(meta["model"]["template"], tokenizer)
    act, tensors = llava_tensors(model, tower, projector_name, dtype)
    config = llava_config(model, tower, meta, act, dtype)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    files = write_weights(tensors, folder, max_shard_bytes)
    _write_processor(folder, tokenizer, tower, meta, jinja)
    _write_generation_config(folder, tokenizer, meta)
    (folder / EXPORT_META).write_text(json.dumps(export_meta(meta, tokenizer, act), indent=2, sort_keys=True) + "\n")
    return files


def export_llava_hf(
    model_source: str,
    out_uri: str,
    *,
    dtype: str | torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> str:
    """Export the model folder `model_source` (a folder URI) to `out_uri`; returns it.

    `dtype` (e.g. "bfloat16") casts every weight; by default the folder's own dtype is kept, which makes
    the export compute what vitune computes. Raises `llava_hf.NotRepresentable` (a `ValueError`) naming
    the reason for a model the layout cannot hold exactly (e.g. `mlp3x_gelu`, a tower neither CLIP nor SigLIP).
    """
    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    with tempfile.TemporaryDirectory(prefix="vitune-export-") as tmp:
        model, tokenizer, meta = load_model_folder(model_source, dtype=torch_dtype)
        merge_lora(model)  # a LoRA folder exports merged: llava-hf holds full weights
        tower = _tower_for(meta, model)
        local = storage.local_path(out_uri)
        target = Path(local) if local is not None else Path(tmp) / "out"
        files = write_llava_hf(model, tokenizer, meta, tower, target, torch_dtype, max_shard_bytes)
        if local is None:
            storage.upload_dir(target, out_uri)
    logger.info("exported %s to %s (llava-hf, projector %s, template %s, %s, %d weight file(s))", model_source,
                out_uri, meta["projector"]["name"], meta["model"]["template"], model.dtype, len(files))
    return out_uri
