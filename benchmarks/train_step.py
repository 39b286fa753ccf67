"""Training-step throughput, measured in one run without Ray: from the feature store vs the tower in the loop.

Prints JSON: tokens/s, samples/s, data-wait share and padding share of the DeepSpeed step fed precomputed
features (what vitune does), and the same model on the same data with the frozen tower decoding and
encoding every image inside the loop (what the official LLaVA loop does), as a ratio. Also the padding
share of length-grouped vs randomly cut micro-batches. The per-worker step needs no Ray, so this runs on
a GPU machine that has none (``train.use_gpu=true``).

    python benchmarks/train_step.py [--images 256] [--tower ViT-B-32] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "platform"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--tower", default="vitune-tiny-vit", help="open_clip model name (random init)")
    p.add_argument("--epochs", type=float, default=2)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import numpy as np
    import torch

    from vitune import storage
    from vitune.config import TrainJobConfig, load_config
    from vitune.data import synthetic
    from vitune.data.records import normalize_image_token, read_records
    from vitune.data.templates import tokenize_record
    from vitune.data.tokenizer import load_tokenizer
    from vitune.model.image import decode_image
    from vitune.model.vision import encode_images, load_vision_tower
    from vitune.train.data import collate, length_grouped, training_row
    from vitune.train.worker import run_single_process

    tmp = tempfile.mkdtemp(prefix="vitune-bench-")
    cfg = load_config(TrainJobConfig, "tiny", [
        "stage=finetune", f"storage.root={tmp}", "train.num_workers=1", "train.init_from=null",
        f"train.epochs={args.epochs}", f"model.vision.name={args.tower}", "train.checkpoint_every=100000",
        "train.log_every=1",
        *args.overrides])
    device = "cuda" if cfg.train.use_gpu else "cpu"
    data = synthetic.generate(storage.join(tmp, "data"), seed=0, num_images=args.images, num_eval_images=0)
    tower = load_vision_tower(cfg.model.vision, device=device)
    tok = load_tokenizer("tiny")
    records = [normalize_image_token(r) for r in read_records(data["records"]["instruct"])]
    image_bytes = {r.image: storage.read_bytes(storage.join(data["root"], r.image)) for r in records}

    t0 = time.perf_counter()
    feats = {k: encode_images(tower, [decode_image(b)])[0].half().cpu().numpy() for k, b in image_bytes.items()}
    feature_job_s = time.perf_counter() - t0
    rows_store, rows_raw = [], []
    for r in records:
        s = tokenize_record(r, cfg.model.template, tok, cfg.model.max_length)
        sample = {"input_ids": np.asarray(s.input_ids), "labels": np.asarray(s.labels)}
        rows_store.append(training_row(sample, feats[r.image]))
        raw = training_row(sample, feats[r.image])
        raw["features"], raw["image_bytes"] = None, image_bytes[r.image]
        rows_raw.append(raw)

    def encode_on_the_fly(images: list[bytes]) -> torch.Tensor:
        return encode_images(tower, [decode_image(b) for b in images])

    def timed(rows, encoder=None) -> dict:
        metrics: list[dict] = []
        t = time.perf_counter()
        run_single_process(cfg, rows, tower.hidden_size, tower.fingerprint(), on_metrics=metrics.append,
                           image_encoder=encoder)
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

    store = timed(rows_store)
    on_the_fly = timed(rows_raw, encode_on_the_fly)

    mb = cfg.train.micro_batch_size
    rows = list(rows_store)
    random.Random(0).shuffle(rows)
    grouped = [collate(g, tok.pad_token_id) for g in length_grouped(rows, mb, megabatch=8, seed=0)]
    random_cut = [collate(rows[i:i + mb], tok.pad_token_id) for i in range(0, len(rows) - mb + 1, mb)]

    def pad_share(batches) -> float:
        return 1 - sum(b["num_tokens"] for b in batches) / sum(b["num_padded"] for b in batches)

    print(json.dumps({
        "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "tower": args.tower, "images": args.images, "samples": len(rows_store),
        "from_feature_store": store,
        "tower_in_loop": on_the_fly,
        "samples_per_s_ratio_store_vs_tower_in_loop": store["samples_per_s"] / on_the_fly["samples_per_s"],
        "feature_job_single_process_s": round(feature_job_s, 2),
        "padding_share_length_grouped": pad_share(grouped),
        "padding_share_random_batches": pad_share(random_cut),
    }, indent=2))


if __name__ == "__main__":
    main()
