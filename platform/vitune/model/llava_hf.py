"""The llava-hf layout (transformers' `LlavaForConditionalGeneration`), both ways: the one definition of the mapping.

vitune's parts ↔ llava-hf's:
- open_clip ViT tower ↔ `CLIPVisionModel` (patch conv, class + position embeddings, `ln_pre`, blocks with the
  fused in-projection split into q/k/v, MLP fc1/fc2, `ln_post`; the tower's GELU or QuickGELU);
- projector ↔ `multi_modal_projector` (Linear, activation, Linear). `mlp2x_gelu` maps one to one.
  The paper's single `linear` projector becomes `linear_1` = the Linear, `projector_hidden_act="linear"`
  (the identity in transformers) and `linear_2` = the identity matrix with zero bias: `I·y + 0` is `y`
  exactly in floating point (every other product is an exact zero), so logits do not move. A GELU between
  the two layers would not be exact, and deeper MLPs have no place in the two-layer projector;
- LM ↔ `language_model` + `lm_head`; feature fingerprint ↔ `vision_feature_layer`,
  `vision_feature_select_strategy` and the image processor (pad to square with the mean colour, or crop).

Weights are written under the names of the published llava-hf checkpoints (`llava-hf/llava-1.5-7b-hf`):
`language_model.model.*`, `language_model.lm_head.*`, `vision_tower.vision_model.*`,
`multi_modal_projector.*`. transformers renames them on load, vLLM and SGLang read them as they are; on
import, transformers' own newer names (`model.language_model.*`, ...) are read too.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vitune.model.projector import parse_projector_name
from vitune.vision_recipe import VisionRecipe, visual_tokens

SELECT_STRATEGY = {"patch": "default", "cls_patch": "full"}  # vitune select → vision_feature_select_strategy
SELECT_FROM_STRATEGY = {v: k for k, v in SELECT_STRATEGY.items()}
LM_PREFIX = "language_model."
TOWER_PREFIX = "vision_tower.vision_model."
PROJECTOR_PREFIX = "multi_modal_projector."
# transformers >= 4.52 saves these; read on import, never written (vLLM maps them back to the above)
_NEW_NAMES = (("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
              ("model.vision_tower.", "vision_tower."), ("model.multi_modal_projector.", PROJECTOR_PREFIX))
_TOWER_ACTS = {"gelu": "gelu", "tanh": "gelu_pytorch_tanh"}  # nn.GELU(approximate=...) → hidden_act


class NotRepresentable(ValueError):
    """A vitune model that the llava-hf layout cannot hold exactly; the message says why."""


def _tower_act(block: nn.Module) -> str:
    act = block.mlp.gelu
    if type(act).__name__ == "QuickGELU":
        return "quick_gelu"
    if isinstance(act, nn.GELU) and act.approximate in ("none", "tanh"):
        return _TOWER_ACTS["gelu" if act.approximate == "none" else "tanh"]
    raise NotRepresentable(f"the tower's MLP activation {type(act).__name__} has no CLIPVisionModel equivalent")


def _check_block(i: int, block: nn.Module) -> None:
    """Refuse what CLIPEncoderLayer cannot compute: custom blocks, layer scale, cross-attention, MLP norms."""
    from open_clip.transformer import ResidualAttentionBlock  # deferred: open_clip is heavy to import

    if type(block) is not ResidualAttentionBlock:
        raise NotRepresentable(f"tower block {i} is a {type(block).__name__}, not a plain CLIP residual block")
    attn = block.attn
    if not isinstance(attn, nn.MultiheadAttention) or attn.in_proj_weight is None or attn.in_proj_bias is None:
        raise NotRepresentable(f"tower block {i} does not use a fused, biased q/k/v in-projection")
    if attn.bias_k is not None:
        raise NotRepresentable(f"tower block {i} has extra key/value biases (add_bias_kv)")
    if not (isinstance(block.ls_1, nn.Identity) and isinstance(block.ls_2, nn.Identity)):
        raise NotRepresentable(f"tower block {i} uses layer scale, which CLIPVisionModel lacks")
    if hasattr(block, "ln_1_kv"):
        raise NotRepresentable(f"tower block {i} is a cross-attention block")


def _check_clip(visual: nn.Module) -> None:
    from open_clip.transformer import VisionTransformer  # deferred: open_clip is heavy to import

    if not isinstance(visual, VisionTransformer):
        raise NotRepresentable(f"the tower is a {type(visual).__name__}, not a CLIP ViT; llava-hf's LLaVA holds a "
                               "CLIPVisionModel (a SigLIP tower maps to SiglipVisionModel: vitune.model.siglip_hf)")


def clip_vision_config(visual: nn.Module) -> dict[str, Any]:
    """`CLIPVisionConfig` fields of an open_clip `VisionTransformer`; `NotRepresentable` when not CLIP-shaped."""
    _check_clip(visual)
    if not isinstance(visual.ln_pre, nn.LayerNorm):
        raise NotRepresentable("the tower has no LayerNorm before its blocks (no_ln_pre), CLIPVisionModel does")
    if visual.conv1.bias is not None:
        raise NotRepresentable("the tower's patch convolution has a bias; CLIP's has none")
    blocks = list(visual.transformer.resblocks)
    for i, block in enumerate(blocks):
        _check_block(i, block)
    acts = {_tower_act(b) for b in blocks}
    norms = [visual.ln_pre] + [ln for b in blocks for ln in (b.ln_1, b.ln_2)]
    eps = {float(ln.eps) for ln in norms}
    if len(acts) != 1 or len(eps) != 1 or not all(isinstance(ln, nn.LayerNorm) for ln in norms):
        raise NotRepresentable(f"the tower mixes activations {sorted(acts)} or LayerNorm eps {sorted(eps)}")
    height, width = visual.image_size
    return {
        "hidden_size": visual.transformer.width,
        "intermediate_size": blocks[0].mlp.c_fc.out_features,
        "num_hidden_layers": len(blocks),
        "num_attention_heads": blocks[0].attn.num_heads,
        "image_size": height,
        "patch_size": visual.patch_size[0],
        "num_channels": 3,
        "hidden_act": acts.pop(),
        "layer_norm_eps": eps.pop(),
    }


def _ln(prefix: str, ln: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{prefix}.weight": ln.weight, f"{prefix}.bias": ln.bias}


def _linear(prefix: str, linear: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{prefix}.weight": linear.weight, f"{prefix}.bias": linear.bias}


def tower_tensors(visual: nn.Module) -> dict[str, torch.Tensor]:
    """The tower's weights under `CLIPVisionModel` names, prefixed `vision_tower.vision_model.`."""
    _check_clip(visual)
    width = visual.transformer.width
    out: dict[str, torch.Tensor] = {
        "embeddings.class_embedding": visual.class_embedding,
        "embeddings.patch_embedding.weight": visual.conv1.weight,
        "embeddings.position_embedding.weight": visual.positional_embedding,
        **_ln("pre_layrnorm", visual.ln_pre),
    }
    for i, block in enumerate(visual.transformer.resblocks):
        layer = f"encoder.layers.{i}"
        weights = block.attn.in_proj_weight.chunk(3)  # [3D, D] → q, k, v each [D, D]
        biases = block.attn.in_proj_bias.chunk(3)
        for name, weight, bias in zip(("q_proj", "k_proj", "v_proj"), weights, biases, strict=True):
            out[f"{layer}.self_attn.{name}.weight"] = weight
            out[f"{layer}.self_attn.{name}.bias"] = bias
        out.update(_linear(f"{layer}.self_attn.out_proj", block.attn.out_proj))
        out.update(_ln(f"{layer}.layer_norm1", block.ln_1))
        out.update(_linear(f"{layer}.mlp.fc1", block.mlp.c_fc))
        out.update(_linear(f"{layer}.mlp.fc2", block.mlp.c_proj))
        out.update(_ln(f"{layer}.layer_norm2", block.ln_2))
    if visual.ln_post.weight.shape == (width,):
        out.update(_ln("post_layernorm", visual.ln_post))
    else:  # an attention-pooled tower: LLaVA never reads the pooled output, so a neutral norm stands in
        out["post_layernorm.weight"] = torch.ones(width, dtype=visual.ln_pre.weight.dtype)
        out["post_layernorm.bias"] = torch.zeros(width, dtype=visual.ln_pre.weight.dtype)
    return {TOWER_PREFIX + k: v for k, v in out.items()}


def _identity(width: int, dtype: torch.dtype, prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}.weight": torch.eye(width, dtype=dtype), f"{prefix}.bias": torch.zeros(width, dtype=dtype)}


def projector_tensors(
    projector: nn.Module, name: str, width: int, dtype: torch.dtype
) -> tuple[str, dict[str, torch.Tensor]]:
    """`(projector_hidden_act, multi_modal_projector.* tensors)` holding vitune projector `name` exactly.

    `width` is the LM's hidden size; an `identity` projector becomes two identity layers.
    """
    spec = parse_projector_name(name)
    first, second = PROJECTOR_PREFIX + "linear_1", PROJECTOR_PREFIX + "linear_2"
    if spec.kind == "mlp_gelu" and spec.depth > 2:
        raise NotRepresentable(f"projector {name!r} has {spec.depth} Linear layers; llava-hf's has two")
    if spec.kind == "mlp_gelu" and spec.depth == 2:
        return "gelu", {**_linear(first, projector[0]), **_linear(second, projector[2])}
    if spec.kind == "identity":
        return "linear", {**_identity(width, dtype, first), **_identity(width, dtype, second)}
    linear = projector if isinstance(projector, nn.Linear) else projector[0]  # 'linear' or 'mlp1x_gelu'
    # linear_2 = I with zero bias passes linear_1's output through unchanged
    return "linear", {**_linear(first, linear), **_identity(width, dtype, second)}


def _is_identity(weight: torch.Tensor, bias: torch.Tensor) -> bool:
    square = weight.dim() == 2 and weight.shape[0] == weight.shape[1]
    return square and torch.equal(weight, torch.eye(weight.shape[0], dtype=weight.dtype)) and not bias.any()


def projector_from_tensors(
    tensors: dict[str, torch.Tensor], act: str, bias: bool = True, name: str | None = None
) -> tuple[str, dict[str, torch.Tensor]]:
    """`multi_modal_projector.*` tensors → `(vitune projector name, its state dict)`; refuse what is not exact.

    `name` (from a vitune export's metadata) tells an `identity` projector from a `linear` one that
    happens to hold the identity; without it such a projector is `linear`.
    """
    get = {k[len(PROJECTOR_PREFIX):]: v for k, v in tensors.items() if k.startswith(PROJECTOR_PREFIX)}
    w1, w2 = get["linear_1.weight"], get["linear_2.weight"]
    b1 = get["linear_1.bias"] if bias else torch.zeros(w1.shape[0], dtype=w1.dtype)
    b2 = get["linear_2.bias"] if bias else torch.zeros(w2.shape[0], dtype=w2.dtype)
    if act == "gelu":
        return "mlp2x_gelu", {"0.weight": w1, "0.bias": b1, "2.weight": w2, "2.bias": b2}
    if act != "linear":
        raise NotRepresentable(f"projector_hidden_act {act!r}: vitune's projectors use 'gelu' (mlp2x_gelu) or "
                               "'linear' (the paper's linear projector)")
    if not _is_identity(w2, b2):
        raise NotRepresentable("projector_hidden_act is 'linear' but linear_2 is not the identity; "
                               "vitune's 'linear' projector is one Linear layer")
    if name == "identity" and _is_identity(w1, b1):
        return "identity", {}
    if name == "mlp1x_gelu":  # one Linear in a Sequential
        return name, {"0.weight": w1, "0.bias": b1}
    return "linear", {"weight": w1, "bias": b1}


def lm_tensors(lm: nn.Module) -> dict[str, torch.Tensor]:
    """The causal LM's weights under `language_model.` (tied output embeddings are left to the config)."""
    prefix = getattr(lm, "base_model_prefix", "")
    if prefix != "model":
        raise NotRepresentable(f"the LM {type(lm).__name__} keeps its decoder under {prefix!r}; the llava-hf "
                               "layout (and vLLM's Llava) need a decoder under 'model' (Llama, Mistral, Qwen2, ...)")
    tied = bool(getattr(lm.config, "tie_word_embeddings", False))
    out = {}
    for key, tensor in lm.state_dict().items():
        if tied and key.startswith("lm_head."):
            continue
        if not key.startswith(("model.", "lm_head.")):
            raise NotRepresentable(f"LM weight {key!r} is neither under 'model.' nor 'lm_head.'")
        out[LM_PREFIX + key] = tensor
    return out


def canonical_names(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Checkpoint names of either transformers generation → the published llava-hf names written here."""
    out = {}
    for key, tensor in tensors.items():
        for new, old in _NEW_NAMES:
            if key.startswith(new):
                key = old + key[len(new):]
                break
        if key.startswith("vision_tower.") and not key.startswith(TOWER_PREFIX):
            key = TOWER_PREFIX + key[len("vision_tower."):]  # transformers 5 drops the vision_model level
        out[key] = tensor
    return out


def split(tensors: dict[str, torch.Tensor]) -> tuple[dict, dict, dict]:
    """`(lm state dict with 'model.'/'lm_head.' keys, tower tensors, projector tensors)` of canonical names."""
    lm = {k[len(LM_PREFIX):]: v for k, v in tensors.items() if k.startswith(LM_PREFIX)}
    tower = {k: v for k, v in tensors.items() if k.startswith(TOWER_PREFIX)}
    projector = {k: v for k, v in tensors.items() if k.startswith(PROJECTOR_PREFIX)}
    unknown = set(tensors) - {LM_PREFIX + k for k in lm} - set(tower) - set(projector)
    if unknown:
        raise ValueError(f"llava-hf checkpoint holds weights of no known part: {sorted(unknown)[:5]}")
    return lm, tower, projector


def image_seq_length(fingerprint: dict[str, Any]) -> int:
    """LlavaProcessor's ``image_seq_length``: the visual tokens of one image (the processor's image size), the
    count ``vitune.vision_recipe.visual_tokens`` gives for the recipe the model was trained on."""
    recipe = VisionRecipe.from_fingerprint(fingerprint)
    return visual_tokens(recipe, recipe.image_size, recipe.image_size)


def image_processor_kwargs(fingerprint: dict[str, Any], mean: tuple[float, ...], std: tuple[float, ...]) -> dict:
    """`LlavaImageProcessor` settings whose pixels are vitune's `model.image.preprocess` for this fingerprint.

    Pad: LLaVA's expand-to-square with `int(mean * 255)`, then a bicubic resize to the tower's size (the
    centre crop is then a no-op). Crop: bicubic resize of the shortest side, then a centre crop.
    """
    size = int(fingerprint["image_size"])
    return {
        "do_pad": fingerprint["image_mode"] == "pad",
        "do_resize": True,
        "size": {"shortest_edge": size},
        "resample": 3,  # PIL bicubic, as vitune resizes
        "do_center_crop": True,
        "crop_size": {"height": size, "width": size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(mean),
        "image_std": list(std),
        "do_convert_rgb": True,
    }


def feature_fields(config: dict[str, Any]) -> dict[str, Any]:
    """The fingerprint fields a llava-hf `config.json` pins down (the image mode is the processor's)."""
    layer = config.get("vision_feature_layer", -2)
    if not isinstance(layer, int):
        raise NotRepresentable(f"vision_feature_layer {layer!r}: vitune reads one feature layer")
    strategy = config.get("vision_feature_select_strategy", "default")
    if strategy not in SELECT_FROM_STRATEGY:
        raise NotRepresentable(f"vision_feature_select_strategy {strategy!r}: vitune knows "
                               f"{list(SELECT_FROM_STRATEGY)}")
    vision = config.get("vision_config") or {}
    fields = {"feature_layer": layer, "select": SELECT_FROM_STRATEGY[strategy]}
    if vision.get("model_type", "clip_vision_model") != "clip_vision_model":
        raise NotRepresentable(f"the checkpoint's tower is a {vision.get('model_type')!r}, not a CLIP ViT")
    fields.update({key: vision[key] for key in ("image_size", "hidden_size") if key in vision})
    return fields


def processor_image_mode(processor: dict[str, Any] | None) -> str | None:
    """`pad` or `crop`: what a llava-hf processor config (nested or not) does to a non-square image."""
    if not processor:
        return None
    image = processor.get("image_processor", processor)
    return "pad" if image.get("do_pad") else "crop"
