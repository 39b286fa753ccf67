"""Training-step throughput, measured in one run without Ray: from the feature store vs the tower in the loop.

Prints JSON: tokens/s, samples/s, data-wait share and padding share of the DeepSpeed step fed precomputed
features (what vitune does), and the same model on the same data with the frozen tower decoding and
encoding every image inside the loop (what the official LLaVA loop does), as a ratio. Also the padding
share of length-grouped vs randomly cut micro-batches. The per-worker loop (``vitune.train.worker``) needs
no Ray, so this runs on a GPU machine that has none (``train.use_gpu=true``); the tower-in-the-loop
variant and the single-process harness are benchmark code and live here.

    python benchmarks/train_step.py [--images 256] [--tower ViT-B-32] [key=value ...]

``--lora`` instead compares a LoRA finetune (``train.lora.*``, from the overrides or ``--lora-args``) with a full
finetune of the same model on the same rows: trainable parameters, the optimizer's state (Adam's two moments)
and checkpoint bytes, and samples/s, each as a LoRA / full ratio.

    python benchmarks/train_step.py --lora [--lora-args "train.lora.r=16 train.lr=2e-2"] [key=value ...]

``--packing`` instead measures ``train.packing`` on two length mixes drawn at random, a pad mix (LLaVA-1.5's:
one tile per image, text-only samples beside) and an anyres mix (the tiny-anyres preset, images of varied sizes,
one to four per sample), each through three samplers: random micro-batches, LLaVA's modality/length megabatches,
and the megabatches packed. It prints each one's padding share over the whole epoch (every micro-batch
collated) and the steady tokens/s (real tokens) and padding share of timed worker steps.

    python benchmarks/train_step.py --packing [--samples 1024] [key=value ...]

``--tower-trains`` instead compares the two store forms (issue 25): samples/s of a finetune fed the feature
store (frozen tower, features computed once) with the same finetune fed the pixel store's uint8 tiles and tuning
the tower in the step (``mm_vision_tower``, gradient checkpointing on), and each form's stored bytes per image.

    python benchmarks/train_step.py --tower-trains [--tower-lr 2e-6] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from vitune import storage
from vitune.config import TrainJobConfig, load_config
from vitune.data import synthetic
from vitune.data.records import read_records
from vitune.data.tokenizer import load_tokenizer
from vitune.model.image import decode_image
from vitune.model.vision import VisionTower, encode_images, load_vision_tower
from vitune.train.data import collate, collate_tokens, row_images, tokenize_row, training_row
from vitune.train.packing import default_budget
from vitune.train.plan import Plan, gradient_accumulation
from vitune.train.sampler import grouped_micro_batches
from vitune.train.worker import Worker, run_loop


class TowerInLoopWorker(Worker):
    """The official LLaVA loop's shape: rows carry image bytes, decoded and encoded by the frozen tower in the step."""

    def __init__(self, *args, tower: VisionTower, **kwargs):
        super().__init__(*args, **kwargs)
        self.tower = tower

    def collate(self, rows: list[dict]) -> dict:
        return {**collate_tokens(rows, self.model.pad_token_id),
                "images": [r["image_bytes"] for r in rows if r["image_bytes"] is not None]}

    def micro_step(self, batch: dict) -> float:
        images = [decode_image(b) for b in batch["images"]]  # text-only rows have none
        feats = encode_images(self.tower, images) if images else None  # [M, N, Dv]
        return super().micro_step({**batch, "image_features": feats})


def run_single_process(cfg: TrainJobConfig, rows: list[dict], feature_dim: int, fingerprint: dict,
                       on_metrics: Callable[[dict], None], make_worker: Callable[..., Worker] = Worker) -> dict:
    """The training loop without Ray: one process (or each torchrun rank, with its slice of ``rows``)."""
    os.environ.setdefault("LOCAL_RANK", "0")
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
        dist.init_process_group("nccl" if cfg.train.use_gpu else "gloo",
                                rank=int(os.environ.get("RANK", 0)), world_size=int(os.environ.get("WORLD_SIZE", 1)))
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = rows[rank::world][: len(rows) // world]
    plan = Plan(len(mine) * world, world, cfg.train.micro_batch_size, gradient_accumulation(cfg, world),
                cfg.train.epochs, cfg.train.max_steps)

    def epoch_rows(epoch: int) -> Iterable[dict]:
        order = list(mine)
        random.Random(cfg.train.seed + epoch).shuffle(order)
        return order

    worker = make_worker(cfg, plan, rank, world, feature_dim)
    return run_loop(worker, epoch_rows, lambda m, c: None, None, fingerprint, on_metrics)


def timed(cfg: TrainJobConfig, rows: list[dict], tower: VisionTower,
          make_worker: Callable[..., Worker] = Worker) -> dict:
    """One training run over ``rows``: wall time, steady-state throughput (first step excluded), final loss."""
    metrics: list[dict] = []
    t = time.perf_counter()
    run_single_process(cfg, rows, tower.hidden_size, tower.fingerprint(), metrics.append, make_worker)
    wall = time.perf_counter() - t
    steady = metrics[1:] or metrics  # the first step pays for warm-up
    return {
        "wall_s": round(wall, 2),
        "steps": len(metrics),
        "samples_per_s": float(np.mean([m["samples_per_s"] for m in steady])),
        "tokens_per_s": float(np.mean([m["tokens_per_s"] for m in steady])),
        "data_wait_share": float(np.mean([m["data_wait_share"] for m in steady])),
        "padding_share": float(np.mean([m["padding_share"] for m in steady])),
        "final_loss": metrics[-1]["loss"],
    }


def _adam_state_bytes(worker: Worker) -> int:
    """Bytes of the optimizer's per-parameter state (Adam's moments; under ZeRO, of this rank's partition)."""
    opt = worker.engine.optimizer
    inner = getattr(opt, "optimizer", opt)  # DeepSpeed's ZeRO optimizer wraps the torch one
    return sum(t.numel() * t.element_size() for st in inner.state.values() for t in st.values()
               if torch.is_tensor(t) and t.dim() > 0)


def _checkpoint_bytes(worker: Worker) -> int:
    with tempfile.TemporaryDirectory(prefix="vitune-bench-ckpt-") as d:
        worker.save_checkpoint(Path(d))
        return sum(f.stat().st_size for f in Path(d).rglob("*") if f.is_file())


def lora_vs_full(cfg: TrainJobConfig, lora_cfg: TrainJobConfig, rows: list[dict], tower: VisionTower) -> dict:
    """The same rows through a full finetune and a LoRA finetune: sizes and throughput, with LoRA / full ratios."""
    out: dict = {}
    for name, c in (("full", cfg), ("lora", lora_cfg)):
        made: list[Worker] = []

        def make(*args, _made=made) -> Worker:
            _made.append(Worker(*args))
            return _made[-1]

        result = timed(c, rows, tower, make)
        worker = made[0]
        out[name] = {**result, "trainable_params": worker.trainable["trainable_params"],
                     "trainable_share": worker.trainable["trainable_share"],
                     "optimizer_state_bytes": _adam_state_bytes(worker), "checkpoint_bytes": _checkpoint_bytes(worker)}
    for key in ("trainable_params", "optimizer_state_bytes", "checkpoint_bytes", "samples_per_s"):
        out[f"{key}_ratio_lora_vs_full"] = out["lora"][key] / out["full"][key]
    return out


def features_vs_tower_in_step(cfg: TrainJobConfig, rows_store: list[dict], pixel_tiles: dict, tower: VisionTower,
                              tower_lr: float) -> dict:
    """samples/s frozen-from-features vs tower-in-the-step on the same rows, and each form's bytes per image."""
    from vitune.features.pixels import stored_pixel_bytes_per_image
    from vitune.features.store import stored_bytes_per_image

    tuned = cfg.model_copy(update={
        "train": cfg.train.model_copy(update={"mm_tunable_parts": "mm_vision_tower,mm_mlp_adapter,mm_language_model",
                                              "mm_vision_tower_lr": tower_lr, "gradient_checkpointing": True})})
    tuned = TrainJobConfig.model_validate(tuned.model_dump())  # the validators pick the pixel form
    rows_pixels = [{**r, "features": pixel_tiles[k] if k is not None else None} for r, k in rows_store]
    frozen = timed(cfg, [r for r, _ in rows_store], tower)
    in_step = timed(tuned, rows_pixels, tower)
    size = tower.image_size
    return {
        "frozen_from_features": frozen, "tower_in_the_step": in_step, "tower_lr": tower_lr,
        "samples_per_s_ratio_tower_in_step_vs_features": in_step["samples_per_s"] / frozen["samples_per_s"],
        "bytes_per_image_features": stored_bytes_per_image(tower.recipe, size, size),
        "bytes_per_image_pixels_uint8": stored_pixel_bytes_per_image(tower.recipe, size, size, "uint8"),
        "bytes_per_image_pixels_bf16": stored_pixel_bytes_per_image(tower.recipe, size, size, "bf16"),
    }


def padding_share(batches: list[dict]) -> float:
    return 1 - sum(b["num_tokens"] for b in batches) / sum(b["num_positions"] for b in batches)


MIXES = {"pad": "tiny", "anyres": "tiny-anyres"}  # mix name → the preset whose vision recipe it uses


def mixed_rows(cfg: TrainJobConfig, samples: int, seed: int, feature_shape: tuple[int, int]) -> list[dict]:
    """``samples`` training rows of varied length drawn at random: 4 in 5 with images (anyres: one to four images
    of sizes from 16 to 160 px a side, so each counts its own visual tokens; pad: one image), the rest text
    only; answers of 1 to 40 sentences. Features are random, in the store's format (``[N, D]`` float16 per image
    for pad, ``[T, N, D]`` tiles for anyres)."""
    from vitune.data.records import validate_record
    from vitune.train.data import with_image_sizes
    from vitune.vision_recipe import model_recipe, tiles_for, visual_tokens

    rng = random.Random(seed)
    recipe = model_recipe(cfg.model.vision)
    tok = load_tokenizer(cfg.model.tokenizer or cfg.model.lm)
    n, d = feature_shape
    rows = []
    for i in range(samples):
        n_images = 0 if rng.random() < 0.2 else (rng.randint(1, 4) if recipe is not None else 1)
        sizes = {f"{i}-{k}.png": (rng.randint(16, 160), rng.randint(16, 160)) for k in range(n_images)}
        prompt = " ".join("<image>" for _ in sizes) + "\nDescribe this." if sizes else f"What is {i} plus one?"
        answer = "It is a thing of some size. " * rng.randint(1, 40)
        raw = {"id": str(i), "conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}]}
        if sizes:
            raw["image"] = list(sizes)
        counts = {k: visual_tokens(recipe, *wh) if recipe is not None else n for k, wh in sizes.items()}
        sample = tokenize_row(validate_record(raw, i), cfg.model.template, tok, cfg.model.max_length, counts)
        if not sample.trainable:
            raise ValueError(f"mixed row {i} cannot be trained: {sample.skip}")
        if recipe is not None:
            sample = with_image_sizes([sample], sizes)[0]
        shapes = [(tiles_for(recipe, *sizes[k]), n, d) if recipe is not None else (n, d) for k in sample.image_keys]
        feats = [np.random.default_rng(i * 8 + k).standard_normal(sh).astype(np.float16) for k, sh in enumerate(shapes)]
        rows.append(training_row(sample, (feats if len(feats) > 1 else feats[0]) if feats else None))
    return rows


def epoch_padding_share(cfg: TrainJobConfig, rows: list[dict], sampler: str) -> float:
    """The padding share of one epoch's micro-batches of ``rows`` under ``sampler`` (random, grouped, packed)."""
    from vitune.train.data import collate_packed
    from vitune.train.sampler import in_order_micro_batches

    t = cfg.train
    order = list(rows)
    random.Random(t.seed).shuffle(order)
    groups = (in_order_micro_batches(order, t.micro_batch_size) if sampler == "random"
              else grouped_micro_batches(order, t.micro_batch_size, gradient_accumulation(cfg, 1), t.seed))
    pad = load_tokenizer(cfg.model.tokenizer or cfg.model.lm).pad_token_id
    budget = t.packing_budget or default_budget(cfg.model.max_length)
    batches = [collate_packed(g, pad, budget) if sampler == "packed" else collate_tokens(g, pad) for g in groups]
    return padding_share(batches)


SAMPLERS = {"random": ["train.group_by_modality_length=false", "train.packing=false"],
            "length_grouped": ["train.group_by_modality_length=true", "train.packing=false"],
            "packed": ["train.group_by_modality_length=true", "train.packing=true"]}


def packing_benchmark(tmp: str, samples: int, overrides: list[str]) -> dict:
    """Per mix and sampler: the epoch's padding share, and timed steps' tokens/s and padding share."""
    out: dict = {}
    for mix, preset in MIXES.items():
        base = ["stage=finetune", f"storage.root={tmp}", "train.num_workers=1", "train.init_from=null",
                "train.epochs=1", "train.checkpoint_every=100000", "train.log_every=1", "train.micro_batch_size=8",
                "train.global_batch_size=64", "model.max_length=1024", *overrides]
        cfg = load_config(TrainJobConfig, preset, base)
        tower = load_vision_tower(cfg.model.vision, device="cpu")
        rows = mixed_rows(cfg, samples, seed=0, feature_shape=(tower.num_patches, tower.hidden_size))
        lengths = [r["length"] for r in rows]
        result: dict = {"samples": len(rows), "length_min": min(lengths), "length_median": int(np.median(lengths)),
                        "length_max": max(lengths), "images_per_sample_max": max(len(row_images(r)) for r in rows)}
        for name, switches in SAMPLERS.items():
            run_cfg = load_config(TrainJobConfig, preset, [*base, *switches])
            from deepspeed.utils import groups

            groups._WORLD_GROUP = None  # each run starts a process group of its own: DeepSpeed's cached one is stale
            try:
                timing = timed(run_cfg, rows, tower)
            finally:
                if dist.is_initialized():
                    dist.destroy_process_group()
            result[name] = {"epoch_padding_share": epoch_padding_share(run_cfg, rows, name),
                            "step_padding_share": timing["padding_share"], "tokens_per_s": timing["tokens_per_s"],
                            "steps": timing["steps"], "final_loss": timing["final_loss"]}
        for name in ("random", "length_grouped"):
            ratio = result["packed"]["tokens_per_s"] / result[name]["tokens_per_s"]
            result[f"tokens_per_s_ratio_packed_vs_{name}"] = ratio
        out[f"{mix}_mix"] = result
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--tower", default="vitune-tiny-vit", help="open_clip model name (random init)")
    p.add_argument("--epochs", type=float, default=2)
    p.add_argument("--lora", action="store_true", help="compare a LoRA finetune with a full finetune instead")
    p.add_argument("--packing", action="store_true", help="measure train.packing on a pad and an anyres mix instead")
    p.add_argument("--samples", type=int, default=1024, help="--packing: samples per mix")
    p.add_argument("--lora-args", default="train.lora.r=16 train.lora.alpha=32 train.lr=2.0e-2 "
                   "train.mm_projector_lr=2.0e-3", help="overrides of the LoRA run (train.lora.enabled=true added)")
    p.add_argument("--tower-trains", action="store_true",
                   help="compare frozen-from-features with the tower tuned in the step (the pixel store) instead")
    p.add_argument("--tower-lr", type=float, default=2e-6, help="--tower-trains: mm_vision_tower_lr (OneVision's)")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)

    tmp = tempfile.mkdtemp(prefix="vitune-bench-")
    if args.packing:
        print(json.dumps({"device": f"cpu ({os.cpu_count()} cores)", "torch_threads": torch.get_num_threads(),
                          **packing_benchmark(tmp, args.samples, args.overrides)}, indent=2))
        return
    cfg = load_config(TrainJobConfig, "tiny", [
        "stage=finetune", f"storage.root={tmp}", "train.num_workers=1", "train.init_from=null",
        f"train.epochs={args.epochs}", f"model.vision.name={args.tower}", "train.checkpoint_every=100000",
        "train.log_every=1",
        "train.packing=false",  # the tower-in-loop worker collates padded rows: compare like with like
        *args.overrides])
    device = "cuda" if cfg.train.use_gpu else "cpu"
    data = synthetic.generate(storage.join(tmp, "data"), seed=0, num_images=args.images, num_eval_images=0)
    tower = load_vision_tower(cfg.model.vision, device=device)
    tok = load_tokenizer("tiny")
    records = read_records(data["records"]["instruct"])
    image_bytes = {r.image: storage.read_bytes(storage.join(data["root"], r.image)) for r in records if r.image}

    t0 = time.perf_counter()
    feats = {k: encode_images(tower, [decode_image(b)])[0].half().cpu().numpy() for k, b in image_bytes.items()}
    feats[None] = None  # text-only records train without features
    feature_job_s = time.perf_counter() - t0
    rows_store, rows_raw = [], []
    for r in records:
        sample = tokenize_row(r, cfg.model.template, tok, cfg.model.max_length, tower.num_patches)
        if not sample.trainable:
            raise ValueError(f"synthetic record {r.id} cannot be trained: {sample.skip}")
        rows_store.append(training_row(sample, feats[r.image]))
        # the same row (length counts the N image positions) with the image's bytes in place of its features
        rows_raw.append({**training_row(sample, feats[r.image]), "features": None,
                         "image_bytes": image_bytes.get(r.image)})

    if args.tower_trains:
        from vitune.model.image import tiles_uint8

        tiles = {k: tiles_uint8(decode_image(b), tower.recipe, tower.mean) for k, b in image_bytes.items()}
        keyed = list(zip(rows_store, [r.image for r in records], strict=True))
        print(json.dumps({
            "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({os.cpu_count()} cores)",
            "tower": args.tower, "samples": len(rows_store),
            **features_vs_tower_in_step(cfg, keyed, tiles, tower, args.tower_lr)}, indent=2))
        return
    if args.lora:
        lora_cfg = load_config(TrainJobConfig, "tiny", [
            "stage=finetune", f"storage.root={tmp}", "train.num_workers=1", "train.init_from=null",
            f"train.epochs={args.epochs}", f"model.vision.name={args.tower}", "train.checkpoint_every=100000",
            "train.log_every=1", *args.overrides, "train.lora.enabled=true", *args.lora_args.split()])
        print(json.dumps({
            "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({os.cpu_count()} cores)",
            "lm": cfg.model.lm, "samples": len(rows_store), "lora_config": lora_cfg.train.lora.model_dump(),
            **lora_vs_full(cfg, lora_cfg, rows_store, tower)}, indent=2))
        return
    store = timed(cfg, rows_store, tower)
    on_the_fly = timed(cfg, rows_raw, tower, lambda *a: TowerInLoopWorker(*a, tower=tower))

    mb = cfg.train.micro_batch_size
    rows = list(rows_store)
    random.Random(0).shuffle(rows)
    grouped = [collate(g, tok.pad_token_id) for g in grouped_micro_batches(rows, mb, chunks=1, seed=0, window=8)]
    random_cut = [collate(rows[i:i + mb], tok.pad_token_id) for i in range(0, len(rows) - mb + 1, mb)]

    print(json.dumps({
        "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "tower": args.tower, "images": args.images, "samples": len(rows_store),
        "from_feature_store": store,
        "tower_in_loop": on_the_fly,
        "samples_per_s_ratio_store_vs_tower_in_loop": store["samples_per_s"] / on_the_fly["samples_per_s"],
        "feature_job_single_process_s": round(feature_job_s, 2),
        "padding_share_length_grouped": padding_share(grouped),
        "padding_share_random_batches": padding_share(random_cut),
    }, indent=2))


if __name__ == "__main__":
    main()
