"""AnyRes training without Ray: a real tile store (load_shard → EncodeShard → manifest, the tiny tower) of images of
different sizes, rows tokenized with each image's own visual-token count, collated as per-image tiles + sizes, and
trained through the real ``Worker.micro_step`` (``benchmarks/train_step.py``'s one-process harness) in align and then
finetune from the align folder: the loss falls, ``image_newline`` trains in finetune only (LLaVA-NeXT: it is outside
the projector, so ``mm_tunable_parts=mm_mlp_adapter`` leaves it at its init; under LoRA it trains beside the
projector), and the model folders serve again with equal logits and the trained newline."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from tests.unit.train.worker_runs import run_worker
from vitune import layout
from vitune.config import TrainJobConfig, load_config
from vitune.data.records import Record, validate_record
from vitune.data.tokenizer import load_tokenizer
from vitune.train.data import collate, tokenize_row, training_row, with_image_sizes
from vitune.train.worker import Worker
from vitune.vision_recipe import model_recipe, tiles_for, visual_tokens

ANYRES = ["model.vision.image_aspect_ratio=anyres", "model.vision.image_grid_pinpoints=[[32, 64], [64, 32], [64, 64]]"]
# (w, h): 3 or 5 tiles of 32 px, and as many visual-token counts
SIZES = {"a.png": (30, 60), "b.png": (64, 64), "c.png": (60, 30), "d.png": (20, 20), "e.png": (48, 40),
         "f.png": (40, 48), "g.png": (64, 32), "h.png": (32, 64)}


def _png(size: tuple[int, int], seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """The features job's per-shard functions on one shard, as the Ray job runs them (without Ray)."""
    from vitune.features.encode import EncodeShard, PreprocessSpec, load_shard
    from vitune.features.store import FeatureStore, write_manifest
    from vitune.model.vision import load_vision_tower
    from vitune.vision_recipe import fingerprint_id

    root = tmp_path_factory.mktemp("anyres")
    images = root / "images"
    images.mkdir()
    for i, (key, size) in enumerate(SIZES.items()):
        (images / key).write_bytes(_png(size, i))
    keys = sorted(SIZES)
    vision = load_config(TrainJobConfig, "tiny", ANYRES).model.vision
    tower = load_vision_tower(vision)
    fp, out = tower.fingerprint(), str(root / "store")
    loaded = load_shard(pa.table({"shard": [0], "keys": [keys]}), str(images), PreprocessSpec.from_tower(tower),
                        max_pixels=10**7)
    result = EncodeShard(vision, out, fingerprint_id(fp), batch_size=4, threads=None)(loaded).to_pylist()
    write_manifest(out, [keys], fp, (tower.num_patches, tower.hidden_size), result)
    return FeatureStore.open(out, expect_fingerprint=fp)


def _records(two_image: bool) -> list[Record]:
    """One record per image; with ``two_image`` the last two records compare two images each."""
    keys = sorted(SIZES)
    raw = [{"id": f"rec-{i}", "image": key, "conversations": [
        {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "Noise. " * (1 + i % 3)}]}
        for i, key in enumerate(keys)]
    if two_image:
        for i in (6, 7):
            raw[i]["image"] = [keys[i], keys[i - 5]]
            raw[i]["conversations"][0]["value"] = "Compare <image> with <image>."
    return [validate_record(r, i) for i, r in enumerate(raw)]


def _rows(cfg: TrainJobConfig, store, records: list[Record]) -> list[dict]:
    tok = load_tokenizer("tiny")
    counts = store.visual_tokens(model_recipe(cfg.model.vision))
    samples = [tokenize_row(r, cfg.model.template, tok, cfg.model.max_length, counts) for r in records]
    samples = with_image_sizes(samples, store.image_sizes())
    feats = store.get(SIZES)
    return [training_row(s, [feats[k] for k in s.image_keys] if s.multi_image else feats[s.image_keys[0]])
            for s in samples]


def _config(tmp_path, stage: str, *extra: str) -> TrainJobConfig:
    return load_config(TrainJobConfig, "tiny", [
        *ANYRES, f"stage={stage}", f"storage.root={tmp_path}", "train.num_workers=1", "train.init_from=null",
        "train.epochs=4", "train.micro_batch_size=2", "train.global_batch_size=4", "train.checkpoint_every=1000",
        "train.log_every=1", "train.lr_schedule=constant", "train.warmup_ratio=0", *extra])


def _train(cfg: TrainJobConfig, rows: list[dict], store) -> tuple[list[dict], Worker]:
    run = run_worker(cfg, rows, store.feature_dim, fingerprint=store.fingerprint)
    return run.metrics, run.worker


def test_rows_count_each_images_own_tokens_and_collate_keeps_tiles_and_sizes(tmp_path, store):
    cfg = _config(tmp_path, "finetune")
    recipe = model_recipe(cfg.model.vision)
    assert store.tiled and store.image_sizes() == SIZES
    assert sorted({tiles_for(recipe, *s) for s in SIZES.values()}) == [3, 5]
    rows = _rows(cfg, store, _records(two_image=True))
    tok = load_tokenizer("tiny")
    for record, row in zip(_records(two_image=True), rows, strict=True):
        want = [visual_tokens(recipe, *SIZES[k]) for k in record.images]
        counts = dict(zip(record.images, want, strict=True))
        sample = tokenize_row(record, cfg.model.template, tok, cfg.model.max_length, counts)
        assert row["length"] == len(row["input_ids"]) + sum(want) - len(want) == sample.length
        assert row["image_sizes"].tolist() == [list(SIZES[k]) for k in record.images]
    assert len({r["length"] - len(r["input_ids"]) for r in rows}) > 2  # the counts differ with the size
    batch = collate(rows[5:8], pad_token_id=0)  # one single-image row, then two two-image rows
    keys = ["f.png", "g.png", "b.png", "h.png", "c.png"]
    assert batch["image_sizes"] == [SIZES[k] for k in keys]
    assert [tuple(f.shape) for f in batch["image_features"]] == [
        (tiles_for(recipe, *SIZES[k]), store.num_patches, store.hidden_size) for k in keys]
    pad_row = {k: v for k, v in rows[0].items() if k != "image_sizes"}
    with pytest.raises(ValueError, match="mixes anyres rows"):
        collate([rows[1], pad_row], pad_token_id=0)


def test_anyres_trains_in_align_then_finetune_and_the_folders_serve(tmp_path, store):
    from vitune.model.folder import load_for_inference, load_model_folder
    from vitune.model.vlm import build_model

    align = _config(tmp_path, "align", "train.lr=1e-2")
    rows = _rows(align, store, _records(two_image=False))
    metrics, worker = _train(align, rows, store)
    losses = [m["loss"] for m in metrics]
    assert len(losses) == 4 * 8 // 4 and all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    # align trains the projector only: the newline stays at its (seeded) init, as LLaVA-NeXT's adapter stage
    init = build_model(align.model, load_tokenizer("tiny"), store.feature_dim, recipe=model_recipe(align.model.vision))
    assert torch.equal(worker.model.image_newline.detach(), init.image_newline.detach())
    assert not torch.equal(worker.model.projector.state_dict()["0.weight"], init.projector.state_dict()["0.weight"])
    # the folder serves: recipe + image_newline, and the same logits as the trained model
    folder = layout.model_folder(align)
    served = load_for_inference(folder, device="cpu")
    assert served.model.recipe == model_recipe(align.model.vision) and served.tower.recipe == served.model.recipe
    batch = collate(rows[:4], worker.model.pad_token_id)
    with torch.no_grad():
        want = worker.model.eval()(batch["input_ids"], batch["attention_mask"], image_features=batch["image_features"],
                                   image_sizes=batch["image_sizes"]).logits
        got = served.model(batch["input_ids"], batch["attention_mask"], image_features=batch["image_features"],
                           image_sizes=batch["image_sizes"]).logits
    torch.testing.assert_close(got, want)

    # finetune from the align folder (ZeRO-3, the tiny preset's): the newline now trains with the LM
    finetune = _config(tmp_path, "finetune", f"train.init_from={folder}", "train.lr=5e-3")
    rows = _rows(finetune, store, _records(two_image=True))
    metrics, _ = _train(finetune, rows, store)
    losses = [m["loss"] for m in metrics]
    assert all(np.isfinite(losses)) and np.mean(losses[-2:]) < np.mean(losses[:2]), losses
    tuned, _, meta = load_model_folder(layout.model_folder(finetune))
    assert meta["vision_recipe"]["grid_pinpoints"] == [[32, 64], [64, 32], [64, 64]]
    assert tuned.image_newline is not None
    assert not torch.equal(tuned.image_newline, served.model.image_newline)  # it trained
    assert load_for_inference(layout.model_folder(finetune), device="cpu").model.recipe == tuned.recipe

    # a LoRA finetune from the same folder: its folder (adapter + projector, the LM by path) keeps the newline
    lora_cfg = _config(tmp_path / "lora", "finetune", f"train.init_from={folder}", "train.lr=5e-3",
                       "train.lora.enabled=true", "train.lora.r=4", "train.zero_stage=2", "train.epochs=1")
    metrics, worker = _train(lora_cfg, rows, store)
    assert all(np.isfinite(m["loss"]) for m in metrics)
    adapted, _, meta = load_model_folder(layout.model_folder(lora_cfg))
    assert meta["lm"]["adapter"] and adapted.recipe == tuned.recipe
    torch.testing.assert_close(adapted.image_newline, worker.model.image_newline.detach().float())
    assert not torch.equal(adapted.image_newline, served.model.image_newline)  # it trained beside the projector


def test_a_tile_shards_rows_decode_as_the_join_task_reads_them(store):
    """The stream join (``join_with_features``) gets a tile shard's rows as numpy batches: ``features`` bytes and
    ``num_tiles``; decoded they are the store's ``[T, N, D]``, and a row whose bytes do not add up is refused."""
    from vitune import storage
    from vitune.train.data import tiles_from_bytes

    table = storage.read_parquet(store.shard_uris()[0])
    blobs = table.column("features").to_numpy(zero_copy_only=False)  # what a numpy batch holds: one bytes per row
    tiles = table.column("num_tiles").to_numpy()
    want = store.get(SIZES)
    for key, blob, t in zip(table.column("image_key").to_pylist(), blobs, tiles, strict=True):
        got = tiles_from_bytes(blob, int(t), (store.num_patches, store.hidden_size), key)
        assert got.dtype == np.float16 and got.shape[0] == t
        np.testing.assert_array_equal(got, want[key])
    with pytest.raises(ValueError, match="'a.png': .* its num_tiles=4 tiles"):
        tiles_from_bytes(blobs[0], 4, (store.num_patches, store.hidden_size), "a.png")


def test_a_pad_folder_gains_the_recipe_and_an_anyres_folder_must_match(tmp_path, store):
    from vitune.model.vlm import build_model
    from vitune.train.driver import check_store_recipe
    from vitune.train.worker import with_recipe

    tok = load_tokenizer("tiny")
    cfg = _config(tmp_path, "finetune")
    recipe = model_recipe(cfg.model.vision)
    pad_cfg = load_config(TrainJobConfig, "tiny", [f"storage.root={tmp_path}"])
    pad = build_model(pad_cfg.model, tok, store.feature_dim)
    moved = with_recipe(pad, recipe, "pad-folder")  # LLaVA-NeXT: a projector aligned on one tile, finetuned on tiles
    assert moved.recipe == recipe and moved.image_newline is not None and moved.projector is pad.projector
    flat = load_config(TrainJobConfig, "tiny", [*ANYRES, "model.vision.mm_patch_merge_type=flat"])
    with pytest.raises(ValueError, match="packs anyres tiles by"):
        with_recipe(moved, model_recipe(flat.model.vision), "anyres-folder")
    with pytest.raises(ValueError, match="packs anyres tiles by"):
        with_recipe(moved, None, "anyres-folder")
    check_store_recipe(cfg, store)  # the store's tiles are the config's
    check_store_recipe(flat, store)  # the merge is the model's: the same tiles
    with pytest.raises(ValueError, match="takes one tile per image"):
        check_store_recipe(pad_cfg, store)
    other = load_config(TrainJobConfig, "tiny", [*ANYRES[:1], "model.vision.image_grid_pinpoints=[[32, 64]]"])
    with pytest.raises(ValueError, match="re-run the features job"):
        check_store_recipe(other, store)
