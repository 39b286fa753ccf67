"""open_clip's SigLIP tower (a timm ViT trunk with a MAP head) ↔ transformers' `SiglipVisionModel`: the weight map.

What maps to what (timm `VisionTransformer` → `SiglipVisionModel`, transformers 5 names, which have no
`vision_model.` prefix of their own; llava-hf's OneVision checkpoints keep the tower under
`vision_tower.vision_model.`):
- `patch_embed.proj` (a biased conv) → `embeddings.patch_embedding`; `pos_embed [1, P, D]` →
  `embeddings.position_embedding.weight [P, D]` (no class token on either side);
- block i: `norm1`/`norm2` → `layer_norm1`/`layer_norm2`; the fused `attn.qkv [3D, D]` split into
  `self_attn.q_proj`/`k_proj`/`v_proj`; `attn.proj` → `self_attn.out_proj`; `mlp.fc1`/`fc2` the same names;
- `norm` → `post_layernorm`; the MAP head `attn_pool`: `latent` → `head.probe`, `q` and `kv` stacked into
  `head.attention.in_proj_*` (kv's rows are k then v), `proj` → `head.attention.out_proj`, `norm` →
  `head.layernorm`, `mlp` → `head.mlp`.

The activation is the trunk's own: timm's SO400M uses exact GELU (`hidden_act="gelu"`), while the published
google/siglip-so400m-patch14-384 config says `gelu_pytorch_tanh`; `siglip_vision_config` writes what the trunk
computes, so the two models agree to float precision (tests/unit/model/test_siglip.py).
Anything else (class tokens, layer scale, q/k norms, another pooling) is `NotRepresentable`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vitune.model.llava_hf import NotRepresentable

_ACTS = {"none": "gelu", "tanh": "gelu_pytorch_tanh"}  # nn.GELU(approximate=...) → hidden_act


def _trunk(visual: nn.Module) -> nn.Module:
    from open_clip.timm_model import TimmModel  # deferred: open_clip is heavy to import

    if not isinstance(visual, TimmModel):
        raise NotRepresentable(f"the tower is a {type(visual).__name__}, not open_clip's timm (SigLIP) tower")
    trunk = visual.trunk
    if getattr(trunk, "cls_token", None) is not None or trunk.num_prefix_tokens:
        raise NotRepresentable("the SigLIP trunk has prefix (class/register) tokens; SiglipVisionModel has none")
    if not isinstance(trunk.norm_pre, nn.Identity) or not isinstance(trunk.fc_norm, nn.Identity):
        raise NotRepresentable("the trunk has a pre-norm or an fc-norm, which SiglipVisionModel lacks")
    if trunk.global_pool != "map" or trunk.attn_pool is None or not isinstance(trunk.head, nn.Identity):
        raise NotRepresentable(f"the trunk pools by {trunk.global_pool!r} with a head; SigLIP's is a bare MAP head")
    return trunk


def _check_block(i: int, block: nn.Module) -> str:
    """The block's `hidden_act`; `NotRepresentable` for what `SiglipEncoderLayer` cannot compute."""
    from timm.models.vision_transformer import Block  # deferred: timm imports torch's heavy parts

    if type(block) is not Block:
        raise NotRepresentable(f"trunk block {i} is a {type(block).__name__}, not timm's plain ViT block")
    inner_norms = (getattr(block.attn, "norm", None), getattr(block.mlp, "norm", None))
    if not all(n is None or isinstance(n, nn.Identity) for n in inner_norms):
        raise NotRepresentable(f"trunk block {i} normalises inside its attention or MLP (scale norms)")
    if not (isinstance(block.ls1, nn.Identity) and isinstance(block.ls2, nn.Identity)):
        raise NotRepresentable(f"trunk block {i} uses layer scale, which SiglipVisionModel lacks")
    attn = block.attn
    if not (isinstance(attn.q_norm, nn.Identity) and isinstance(attn.k_norm, nn.Identity)) or attn.qkv.bias is None:
        raise NotRepresentable(f"trunk block {i} has q/k norms or an unbiased qkv projection")
    act = block.mlp.act
    if not isinstance(act, nn.GELU):
        raise NotRepresentable(f"trunk block {i}'s MLP activation {type(act).__name__} is not a GELU")
    return _ACTS[act.approximate]


def siglip_vision_config(visual: nn.Module) -> dict[str, Any]:
    """`SiglipVisionConfig` fields of open_clip's SigLIP tower."""
    trunk = _trunk(visual)
    blocks = list(trunk.blocks)
    acts = {_check_block(i, b) for i, b in enumerate(blocks)}
    eps = {float(ln.eps) for b in blocks for ln in (b.norm1, b.norm2)} | {float(trunk.norm.eps)}
    if len(acts) != 1 or len(eps) != 1:
        raise NotRepresentable(f"the trunk mixes activations {sorted(acts)} or LayerNorm eps {sorted(eps)}")
    if trunk.attn_pool.num_heads != blocks[0].attn.num_heads:
        raise NotRepresentable("the MAP head has another head count than the blocks; SiglipVisionModel shares one")
    height, width = trunk.patch_embed.img_size
    patch_h, patch_w = trunk.patch_embed.patch_size
    if height != width or patch_h != patch_w:
        raise NotRepresentable(f"the trunk is not square ({height}x{width}, patch {patch_h}x{patch_w})")
    return {
        "hidden_size": trunk.embed_dim,
        "intermediate_size": blocks[0].mlp.fc1.out_features,
        "num_hidden_layers": len(blocks),
        "num_attention_heads": blocks[0].attn.num_heads,
        "image_size": height,
        "patch_size": patch_h,
        "num_channels": trunk.patch_embed.proj.in_channels,
        "hidden_act": acts.pop(),
        "layer_norm_eps": eps.pop(),
    }


def _params(prefix: str, module: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{name}": p for name, p in module.named_parameters()}


def siglip_tower_tensors(visual: nn.Module) -> dict[str, torch.Tensor]:
    """open_clip's SigLIP tower's weights under `SiglipVisionModel` names (its `state_dict` keys)."""
    trunk = _trunk(visual)
    out: dict[str, torch.Tensor] = {
        **_params("embeddings.patch_embedding", trunk.patch_embed.proj),
        "embeddings.position_embedding.weight": trunk.pos_embed[0],  # [1, P, D] → [P, D]
    }
    for i, block in enumerate(trunk.blocks):
        layer = f"encoder.layers.{i}"
        weights, biases = block.attn.qkv.weight.chunk(3), block.attn.qkv.bias.chunk(3)  # [3D, D] → q, k, v
        for name, weight, bias in zip(("q_proj", "k_proj", "v_proj"), weights, biases, strict=True):
            out[f"{layer}.self_attn.{name}.weight"] = weight
            out[f"{layer}.self_attn.{name}.bias"] = bias
        out.update(_params(f"{layer}.self_attn.out_proj", block.attn.proj))
        out.update(_params(f"{layer}.layer_norm1", block.norm1))
        out.update(_params(f"{layer}.layer_norm2", block.norm2))
        out.update(_params(f"{layer}.mlp.fc1", block.mlp.fc1))
        out.update(_params(f"{layer}.mlp.fc2", block.mlp.fc2))
    out.update(_params("post_layernorm", trunk.norm))
    pool = trunk.attn_pool
    if pool.pos_embed is not None or not isinstance(pool.q_norm, nn.Identity) or pool.latent_len != 1:
        raise NotRepresentable("the MAP head has a position embedding, q/k norms or several latents")
    out["head.probe"] = pool.latent
    out["head.attention.in_proj_weight"] = torch.cat([pool.q.weight, pool.kv.weight])  # [3D, D]: q, k, v
    out["head.attention.in_proj_bias"] = torch.cat([pool.q.bias, pool.kv.bias])
    out.update(_params("head.attention.out_proj", pool.proj))
    out.update(_params("head.layernorm", pool.norm))
    out.update(_params("head.mlp.fc1", pool.mlp.fc1))
    out.update(_params("head.mlp.fc2", pool.mlp.fc2))
    return out


def trunk_state_from_hf(tensors: dict[str, torch.Tensor], visual: nn.Module) -> dict[str, torch.Tensor]:
    """`SiglipVisionModel` weights (with or without the `vision_model.` prefix) → the timm trunk's state dict.

    The reverse of `siglip_tower_tensors`: q/k/v are stacked back into `attn.qkv`, the head's in-projection split
    into `q` and `kv`. A checkpoint without the MAP head (`vision_use_head=False`, as LLaVA keeps the tower) leaves
    the trunk's own head, which LLaVA never reads; any other missing or extra weight is an error.
    """
    trunk = _trunk(visual)
    state = {k.removeprefix("vision_model."): v for k, v in tensors.items()}
    expected = siglip_tower_tensors(visual)
    unknown = sorted(set(state) - set(expected))
    missing = sorted(k for k in set(expected) - set(state) if not k.startswith("head."))
    if unknown or missing:
        raise ValueError(f"SigLIP weights do not fit the tower: missing {missing[:3]}, unknown {unknown[:3]}")
    out = {"patch_embed.proj.weight": state["embeddings.patch_embedding.weight"],
           "patch_embed.proj.bias": state["embeddings.patch_embedding.bias"],
           "pos_embed": state["embeddings.position_embedding.weight"][None],  # [P, D] → [1, P, D]
           "norm.weight": state["post_layernorm.weight"], "norm.bias": state["post_layernorm.bias"]}
    for i in range(len(trunk.blocks)):
        hf, timm = f"encoder.layers.{i}", f"blocks.{i}"
        for kind in ("weight", "bias"):
            out[f"{timm}.attn.qkv.{kind}"] = torch.cat([state[f"{hf}.self_attn.{n}.{kind}"]
                                                        for n in ("q_proj", "k_proj", "v_proj")])
            for src, dst in (("self_attn.out_proj", "attn.proj"), ("layer_norm1", "norm1"),
                             ("layer_norm2", "norm2"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
                out[f"{timm}.{dst}.{kind}"] = state[f"{hf}.{src}.{kind}"]
    if "head.probe" in state:
        width = trunk.embed_dim
        out["attn_pool.latent"] = state["head.probe"]
        for kind in ("weight", "bias"):
            in_proj = state[f"head.attention.in_proj_{kind}"]  # [3D, ...]: q, then k and v
            out[f"attn_pool.q.{kind}"], out[f"attn_pool.kv.{kind}"] = in_proj[:width], in_proj[width:]
            for src, dst in (("attention.out_proj", "proj"), ("layernorm", "norm"), ("mlp.fc1", "mlp.fc1"),
                             ("mlp.fc2", "mlp.fc2")):
                out[f"attn_pool.{dst}.{kind}"] = state[f"head.{src}.{kind}"]
    return out


def load_hf_folder(visual: nn.Module, folder: str) -> None:
    """Load a local `SiglipVisionModel.save_pretrained` folder's weights into open_clip's SigLIP tower, in place."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    path = Path(folder)
    model_type = json.loads((path / "config.json").read_text()).get("model_type")
    if model_type != "siglip_vision_model":
        raise ValueError(f"{folder}: config.json model_type {model_type!r}; a SigLIP tower folder is a "
                         "SiglipVisionModel save ('siglip_vision_model')")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder} holds no *.safetensors weights")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        tensors.update(load_file(str(file)))
    state = trunk_state_from_hf(tensors, visual)
    missing, unexpected = visual.trunk.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("attn_pool.") for k in missing):
        raise ValueError(f"SigLIP weights do not fit the trunk: missing {missing[:3]}, unexpected {unexpected[:3]}")
