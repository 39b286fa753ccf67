"""Model folder: a self-contained, versioned save of the VLM that loads without any training code.

Layout under a local path or s3:// prefix:
    vitune_model.json      format version, model config, feature fingerprint, token ids, extra, and every other
                           file with its size: the completion marker, published last (`_publish`)
    projector.safetensors  projector weights
    image_newline.safetensors  an anyres (spatial_unpad) model's learned row newline; the meta then holds the
                           vision recipe (`vision_recipe`: grid, merge, anyres_max_N cap) the model packs tiles by
    vision_tower.safetensors  a tower the run trained (LLaVA-NeXT's mm_vision_tower): open_clip's `visual` state;
                           the meta's `vision_tower` says so and its fingerprint has `tower_weights: trained`, and
                           loaders build the named tower, then take these weights (the pretrained tag's are not it)
    lm/                    the language model (HF `save_pretrained`), absent when `include_lm=False`
                           (align stage: the LM is frozen, so the folder names the LM path to reload)
    tokenizer/             the tokenizer, `<image>` included
    adapter/               a LoRA finetune's adapter in peft's format (`vitune.model.lora`); the LM is then the
                           base named in the meta (`lm.source`), and `lm.base_digest` fingerprints its weights

`load_for_inference` is the one way evaluation and serving load a model to answer with: a folder URI (other
references are resolved first, `vitune.references`), the model plus its vision tower (fingerprint checked
against the features the model was trained on), under one device and dtype rule.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from vitune import __version__, storage
from vitune.config import VisionConfig
from vitune.family import model_family
from vitune.layout import MODEL_META_FILE
from vitune.model import lora
from vitune.model.projector import build_projector
from vitune.model.vision import VisionTower, load_vision_tower
from vitune.model.vlm import VisionLanguageModel, load_lm
from vitune.vision_recipe import FingerprintMismatch, VisionRecipe, check_fingerprint

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
META_FILE = MODEL_META_FILE
PROJECTOR_FILE = "projector.safetensors"
NEWLINE_FILE = "image_newline.safetensors"
TOWER_FILE = "vision_tower.safetensors"
LM_DIR = "lm"
TOKENIZER_DIR = "tokenizer"


def _projector_in_dim(model: VisionLanguageModel) -> int:
    first_linear = next((m for m in model.projector.modules() if isinstance(m, nn.Linear)), None)
    return first_linear.in_features if first_linear is not None else model.lm.get_input_embeddings().embedding_dim


def _write_folder(
    folder: Path,
    model: VisionLanguageModel,
    tokenizer: Any,
    model_cfg: Any,
    fingerprint: dict[str, Any],
    include_lm: bool,
    extra: dict[str, Any] | None,
    adapter: tuple[Callable[[Path], None], dict[str, Any]] | None = None,
) -> None:
    state = {name: t.detach().contiguous().cpu() for name, t in model.projector.state_dict().items()}
    save_file(state, str(folder / PROJECTOR_FILE))
    if model.image_newline is not None:
        save_file({"image_newline": model.image_newline.detach().contiguous().cpu()}, str(folder / NEWLINE_FILE))
    tower = model.vision_tower
    trained_tower = tower is not None and tower.weights_trained
    if trained_tower:
        save_file(tower.trained_state(), str(folder / TOWER_FILE))
    if include_lm:
        model.lm.save_pretrained(str(folder / LM_DIR))
    lm_meta: dict[str, Any] = {"included": include_lm, "source": LM_DIR if include_lm else model_cfg.lm}
    if adapter is not None:
        write_adapter, adapter_meta = adapter
        write_adapter(folder / lora.ADAPTER_DIR)
        lm_meta.update(adapter_meta, adapter=lora.ADAPTER_DIR)
    tokenizer.save_pretrained(str(folder / TOKENIZER_DIR))
    meta = {
        "format_version": FORMAT_VERSION,
        "vitune_version": __version__,
        "model": model_cfg.model_dump(mode="json"),
        "family": model_family(model_cfg, getattr(model.lm.config, "model_type", None)),
        "fingerprint": fingerprint,
        "image_token_id": model.image_token_id,
        "pad_token_id": model.pad_token_id,
        "stop_token_ids": list(model.eos_token_ids),
        "projector": {
            "name": model_cfg.projector,
            "in_dim": _projector_in_dim(model),
            "out_dim": model.lm.get_input_embeddings().embedding_dim,
        },
        "lm": lm_meta,
        "dtype": str(model.dtype).removeprefix("torch."),
        "extra": extra or {},
    }
    if trained_tower:  # only then: a folder of a frozen tower's run names the tower by its config alone
        meta["vision_tower"] = {"trained": True, "file": TOWER_FILE}
    if model.recipe is not None:  # only then: a pad/crop folder's meta is as it always was
        meta["vision_recipe"] = dataclasses.asdict(model.recipe)
    storage.write_json(str(folder / META_FILE), meta)


def folder_recipe(meta: dict[str, Any]) -> VisionRecipe | None:
    """The anyres recipe a folder's model packs its tiles by (None for a pad/crop model)."""
    fields = meta.get("vision_recipe")
    if not fields:
        return None
    return VisionRecipe(**{**fields, "grid_pinpoints": tuple(tuple(p) for p in fields.get("grid_pinpoints", ()))})


def save_model_folder(
    model: VisionLanguageModel,
    tokenizer: Any,
    model_cfg: Any,
    fingerprint: dict[str, Any],
    uri: str,
    include_lm: bool = True,
    extra: dict[str, Any] | None = None,
    adapter: tuple[Callable[[Path], None], dict[str, Any]] | None = None,
) -> str:
    """Write the model folder to `uri` (local path or s3://); returns `uri`.

    `adapter`: a LoRA folder's `(write(adapter_dir), meta)`: the writer puts the peft adapter there, the meta
    (base digest, quantization) joins the folder's `lm` entry.
    """
    local = storage.local_path(uri)
    # written whole in a staging folder first, then published (see `_publish`): a reader never sees a part
    staging_parent = Path(local).parent if local is not None else None
    if staging_parent is not None:
        staging_parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{Path(uri).name}.staging-", dir=staging_parent) as tmp:
        _write_folder(Path(tmp), model, tokenizer, model_cfg, fingerprint, include_lm, extra, adapter)
        _publish(Path(tmp), uri)
    logger.info("saved model folder %s (LM %s)", uri, "included" if include_lm else f"by path {model_cfg.lm!r}")
    return uri


def _publish(staging: Path, uri: str) -> None:
    """Publish a complete staged folder at `uri`; `vitune_model.json`, which lists every file with its size,
    is the completion marker: written last, removed first when a folder is replaced, required by loaders.

    Local: one rename of the staged folder into place (an existing folder is renamed aside first and then
    deleted). S3 has no rename: the old marker is deleted, then the old objects, the new files are uploaded,
    and the marker goes last.
    """
    meta_path = staging / META_FILE
    meta = storage.read_json(str(meta_path))
    meta["files"] = {p.relative_to(staging).as_posix(): p.stat().st_size for p in sorted(staging.rglob("*"))
                     if p.is_file() and p != meta_path}
    storage.write_json(str(meta_path), meta)
    local = storage.local_path(uri)
    if local is not None:
        target = Path(local)
        aside = target.with_name(f".{target.name}.old-{uuid.uuid4().hex}")
        staging.chmod(0o755)  # mkdtemp's 0700 would hide the folder from a replica running as another user
        if target.exists():
            target.rename(aside)
        staging.rename(target)
        staging.mkdir()  # TemporaryDirectory cleans up the (now empty) staging name
        shutil.rmtree(aside, ignore_errors=True)
        return
    if storage.exists(storage.join(uri, META_FILE)):
        storage.delete(storage.join(uri, META_FILE))  # unpublish first: from here on loaders refuse the folder
    storage.delete(uri)
    for path in sorted(staging.rglob("*")):
        if path.is_file() and path != meta_path:
            storage.write_bytes(storage.join(uri, path.relative_to(staging).as_posix()), path.read_bytes())
    storage.write_bytes(storage.join(uri, META_FILE), meta_path.read_bytes())


def check_complete(folder: Path, meta: dict[str, Any], uri: str) -> None:
    """Refuse a folder whose files differ from the list in its marker (a folder being written or replaced)."""
    files = meta.get("files")
    if files is None:
        logger.warning("model folder %s predates file lists in %s: its completeness is not checked", uri, META_FILE)
        return
    for rel, size in files.items():
        path = folder / rel
        have = path.stat().st_size if path.is_file() else None
        if have != size:
            raise RuntimeError(f"model folder {uri} is incomplete ({rel}: {'missing' if have is None else have} "
                               f"bytes, its {META_FILE} lists {size}): it is being written or replaced; retry")


def read_meta(uri: str) -> dict[str, Any]:
    """The folder's `vitune_model.json`, checked for a format version this code understands."""
    meta_uri = storage.join(uri, META_FILE)
    if not storage.exists(meta_uri):
        raise FileNotFoundError(f"{uri} is not a vitune model folder (no {META_FILE})")
    meta = storage.read_json(meta_uri)
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"model folder {uri} has format version {version}; this vitune reads {FORMAT_VERSION}")
    return meta


def _load_from(folder: Path, meta: dict[str, Any], device: str | torch.device, dtype: torch.dtype | None):
    # deferred: transformers is slow to import and not every caller needs it
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder / TOKENIZER_DIR))
    lm_info = meta["lm"]
    if lm_info["included"]:
        kwargs = {"dtype": dtype} if dtype is not None else {}
        lm = AutoModelForCausalLM.from_pretrained(str(folder / LM_DIR), **kwargs)
    else:
        lm = load_lm(lm_info["source"], tokenizer, dtype)
    if lm_info.get("adapter"):
        lm = _with_adapter(lm, folder / lm_info["adapter"], lm_info)
    proj = meta["projector"]
    projector = build_projector(proj["name"], proj["in_dim"], proj["out_dim"])
    projector.load_state_dict(load_file(str(folder / PROJECTOR_FILE)))
    weight = lm.get_input_embeddings().weight
    projector.to(device=weight.device, dtype=weight.dtype)
    model = VisionLanguageModel(
        projector, lm, meta["image_token_id"], pad_token_id=meta["pad_token_id"], eos_token_id=meta["stop_token_ids"],
        recipe=folder_recipe(meta),
    )
    if model.image_newline is not None:
        with torch.no_grad():
            model.image_newline.copy_(load_file(str(folder / NEWLINE_FILE))["image_newline"])
    if meta.get("vision_tower", {}).get("trained"):  # the run's tower, in the model as it trained
        tower = load_vision_tower(VisionConfig.model_validate(meta["model"]["vision"]), recipe=folder_recipe(meta))
        model.attach_tower(tower.load_trained(load_file(str(folder / meta["vision_tower"]["file"]))))
    return model.to(device).eval(), tokenizer


def _with_adapter(lm: Any, adapter_dir: Path, lm_info: dict[str, Any]) -> Any:
    """The base LM with the folder's LoRA adapter; warns when the base is not the one it was trained over."""
    want = lm_info.get("base_digest")
    if want:
        dtype = getattr(torch, lm_info.get("base_dtype", "float32"))
        have = lora.base_digest((name, p.to(dtype)) for name, p in lora.base_parameters(lm))
        if have != want:
            logger.warning("the LoRA adapter in %s was trained over other base weights than %r gives now "
                           "(digest %s…, trained over %s…); its answers may be off", adapter_dir,
                           lm_info["source"], have[:12], want[:12])
    return lora.load_adapter(lm, adapter_dir)


def load_model_folder(
    uri: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> tuple[VisionLanguageModel, Any, dict[str, Any]]:
    """Load `(model, tokenizer, meta)` from a model folder; remote folders are downloaded first."""
    meta = read_meta(uri)
    local = storage.local_path(uri)
    if local is not None:
        check_complete(Path(local), meta, uri)
        model, tokenizer = _load_from(Path(local), meta, device, dtype)
    else:
        tmp = tempfile.mkdtemp(prefix="vitune-model-")
        try:
            storage.download_dir(uri, tmp)
            meta = read_meta(tmp)  # the copy's own marker: the one that lists the files just downloaded
            check_complete(Path(tmp), meta, uri)
            model, tokenizer = _load_from(Path(tmp), meta, device, dtype)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("loaded model folder %s (format %d, %s)", uri, meta["format_version"], model.dtype)
    return model, tokenizer, meta


@dataclass
class InferenceModel:
    """What answering needs: the model, its tokenizer, its vision tower and the folder's `vitune_model.json`."""

    model: VisionLanguageModel
    tokenizer: Any
    tower: VisionTower
    meta: dict[str, Any]


def resolve_device(device: str) -> str:
    """`"auto"` → `"cuda"` when a GPU is visible, else `"cpu"`; any other name passes through."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def inference_dtype(dtype: str, device: str, meta: dict[str, Any]) -> torch.dtype:
    """The model's dtype: `dtype` when named; `"auto"` = fp32 on CPU, the folder's own dtype on a GPU."""
    if dtype != "auto":
        return getattr(torch, dtype)
    if torch.device(device).type == "cpu":
        return torch.float32  # half precision on CPU is slow and poorly supported
    return getattr(torch, meta.get("dtype", "float32"))


def load_for_inference(source: str, device: str = "auto", dtype: str = "auto") -> InferenceModel:
    """Load the model folder `source` (a folder URI) and its vision tower, ready to answer.

    The tower runs in the model's dtype on a GPU and in fp32 on CPU; it must give the features the model
    was trained on (the folder's fingerprint), or loading fails naming the fields that differ.
    """
    device = resolve_device(device)
    model_dtype = inference_dtype(dtype, device, read_meta(source))
    model, tokenizer, meta = load_model_folder(source, device=device, dtype=model_dtype)
    tower_dtype = torch.float32 if torch.device(device).type == "cpu" else model.dtype
    if model.vision_tower is not None:  # the folder's trained tower: answering computes features with it
        tower = model.vision_tower.to(device=device, dtype=tower_dtype)
        model.add_module("vision_tower", None)  # the tower answers beside the model, as a pretrained one does
    else:
        tower = load_vision_tower(VisionConfig.model_validate(meta["model"]["vision"]), device=device,
                                  dtype=tower_dtype, recipe=model.recipe)
    try:
        check_fingerprint(meta.get("fingerprint") or None, tower.fingerprint(), source)
    except FingerprintMismatch as exc:
        detail = "; ".join(f"{field}: trained on {want!r}, tower gives {have!r}" for field, want, have in exc.diffs)
        raise ValueError(f"model {source} was trained on other features than its tower gives: {detail}") from None
    logger.info("loaded %s for inference on %s (%s; tower %s)", source, device, model.dtype, tower_dtype)
    return InferenceModel(model, tokenizer, tower, meta)
