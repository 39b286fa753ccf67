"""The per-worker training loop: DeepSpeed ZeRO over the VLM, fed micro-batches of features + tokens.

The driver runs ``run_loop`` on every Ray Train worker; the loop itself only needs ``torch.distributed``
and, per epoch, an iterable of training rows (``vitune.train.data.training_row``), so it also runs in one
plain process (``benchmarks/train_step.py``). Stage is data: ``freeze_for_stage`` decides what trains,
the config decides the rest. The step plan and optimizer set-up are ``vitune.train.plan``'s; what a worker
writes (checkpoints, the model folder) is ``vitune.train.checkpoint``'s. A run that reads the pixel store runs
its vision tower in the step (``vitune.train.tower``), tuned or frozen by ``mm_tunable_parts``.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from vitune import layout
from vitune.config import TrainJobConfig
from vitune.data.tokenizer import load_tokenizer
from vitune.model import lora
from vitune.model.folder import load_model_folder
from vitune.model.vlm import VisionLanguageModel, build_model
from vitune.train import checkpoint
from vitune.train.data import collate, collate_packed, image_features_to
from vitune.train.packing import default_budget
from vitune.train.plan import Plan, deepspeed_config, lr_lambda, param_groups
from vitune.train.sampler import grouped_micro_batches, in_order_micro_batches
from vitune.train.tower import attach_run_tower, part_counts, tower_inputs
from vitune.vision_recipe import VisionRecipe, model_recipe

log = logging.getLogger(__name__)

# dense bf16 peak FLOP/s per GPU, for MFU
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "L4": 121e12}


def enable_tf32(wanted: bool) -> bool:
    """TF32 matmuls and convolutions (LLaVA's ``--tf32 True``) when wanted and the GPU has them (Ampere+)."""
    on = wanted and torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8
    if on:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        log.info("TF32 matmuls enabled (compute capability %s)", torch.cuda.get_device_capability())
    return on


def model_flops_per_token(model: torch.nn.Module, stage: str) -> float:
    """6·N per token for trained weights, 4·N for frozen ones (forward + input grads: the LM in align, the
    base under LoRA). ``stage`` is implied by what ``requires_grad``; kept for callers."""
    summary = lora.trainable_summary(model)
    trainable = summary["trainable_params"]
    return 6 * trainable + 4 * (summary["total_params"] - trainable)


def peak_flops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def _packed(batch: dict, device: torch.device) -> dict[str, torch.Tensor]:
    """The forward's packed-row argument, when the micro-batch was packed (``collate_packed``)."""
    segments = batch.get("segment_ids")
    return {} if segments is None else {"segment_ids": segments.to(device)}


class Worker:
    """One data-parallel rank: the model under DeepSpeed, the step, checkpoints and the model folder."""

    def __init__(self, cfg: TrainJobConfig, plan: Plan, rank: int, world_size: int, feature_dim: int):
        import deepspeed  # deferred: slow to import and probes accelerators; only training processes need it

        self.cfg, self.plan, self.rank, self.world = cfg, plan, rank, world_size
        self.feature_dim = feature_dim
        torch.manual_seed(cfg.train.seed)
        self.device = torch.device(f"cuda:{torch.cuda.current_device()}") if cfg.train.use_gpu else torch.device("cpu")
        enable_tf32(cfg.train.tf32)
        self.tokenizer, self.model, self.init_meta = self._build()
        self.lora = cfg.train.lora.enabled
        if self.lora:
            self._wrap_lora()
        else:
            self.model.freeze(cfg.tunable_parts, label=f"stage {cfg.stage}")
        self.trainable = {**lora.trainable_summary(self.model), **part_counts(self.model)}
        log.info("what trains: %s", self.trainable)
        if cfg.train.gradient_checkpointing:
            self.model.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        params = [p for p in self.model.parameters() if p.requires_grad]
        groups = param_groups(self.model, cfg.train.lr, cfg.train.mm_projector_lr, cfg.train.weight_decay,
                              cfg.train.mm_vision_tower_lr)
        optimizer = torch.optim.AdamW(groups, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(plan.total_steps, cfg.train.warmup_ratio, cfg.train.lr_schedule))
        self.ds_config = deepspeed_config(cfg, world_size)
        self.engine, _, _, _ = deepspeed.initialize(
            model=self.model, optimizer=optimizer, model_parameters=params, lr_scheduler=scheduler,
            config=self.ds_config, dist_init_required=False)
        self.flops_per_token = model_flops_per_token(self.model, cfg.stage)
        self.step = 0
        self.epoch = 0
        self.micro_in_epoch = 0

    def _build(self) -> tuple[Any, torch.nn.Module, dict | None]:
        cfg = self.cfg
        if cfg.train.init_from:
            model, tokenizer, meta = load_model_folder(cfg.train.init_from)  # a folder: the driver resolved it
            log.info("initialised from %s (stage %s)", cfg.train.init_from, meta.get("extra", {}).get("stage"))
            if lora.is_lora(model.lm):  # a LoRA folder: train on from its merged weights, which no path names
                lora.merge_lora(model)
                meta = {**meta, "lm": {**meta["lm"], "included": True}}
            model = with_recipe(model, model_recipe(cfg.model.vision), cfg.train.init_from)
            return tokenizer, self._with_tower(model).to(self.device).train(), meta
        tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.lm)
        model = build_model(cfg.model, tokenizer, self.feature_dim, recipe=model_recipe(cfg.model.vision))
        return tokenizer, self._with_tower(model).to(self.device).train(), None

    def _with_tower(self, model: VisionLanguageModel) -> VisionLanguageModel:
        """The model with its tower attached when the run reads pixels; a folder's trained tower cannot train on
        a feature store (its features are the pretrained tower's)."""
        if self.cfg.store_form == "pixels":
            attach_run_tower(model, self.cfg, self.device)
        elif model.vision_tower is not None:
            raise ValueError(f"train.init_from={self.cfg.train.init_from} holds a trained vision tower, and a "
                             "feature store holds the pretrained tower's features: train from the pixel store "
                             "(features.form=pixels), where the folder's tower runs in the step")
        return model

    def _wrap_lora(self) -> None:
        """LoRA (``train.lora``): the projector (when mm_mlp_adapter is tuned, as by default) and an anyres model's
        ``image_newline`` train, the LM's own weights freeze, adapters wrap its linears."""
        settings = self.cfg.train.lora
        if self._lm_not_rebuildable():
            raise ValueError(f"train.lora.enabled: the base LM of train.init_from={self.cfg.train.init_from} is "
                             "stored in that folder, not named by a path; a LoRA folder names its base, so export "
                             "the LM (or start from a folder whose LM is a path) first")
        self.model.projector.requires_grad_("mm_mlp_adapter" in self.cfg.tunable_parts)
        if self.model.image_newline is not None:  # anyres: trains beside the projector, as it does in finetune
            self.model.image_newline.requires_grad_(True)
        if self.model.vision_tower is not None:  # the tower trains fully beside the adapters when it is tuned
            if "mm_vision_tower" in self.cfg.tunable_parts:
                self.model.vision_tower.make_trainable(self.model.vision_tower.grad_checkpointing)
            else:
                self.model.vision_tower.requires_grad_(False)
        self.model.lm.requires_grad_(False)  # the adapters added below are the LM's only trainable weights
        lm = self.model.lm
        if settings.quantization == "nf4":
            lm = lora.quantize_lm(lm, self.device)
        self.model.lm = lora.apply_lora(lm, settings, base_name=self.cfg.model.lm)

    # --- checkpoints -------------------------------------------------------------------------------
    def save_checkpoint(self, folder: Path) -> None:
        position = {"step": self.step, "epoch": self.epoch, "micro_in_epoch": self.micro_in_epoch}
        checkpoint.save_checkpoint(self.engine, folder, position, self.rank, lora_only=self.lora)

    def load_checkpoint(self, folder: Path) -> None:
        state = checkpoint.load_checkpoint(self.engine, folder, lora_only=self.lora)
        self.step, self.epoch, self.micro_in_epoch = state["step"], state["epoch"], state["micro_in_epoch"]
        if self.micro_in_epoch >= self.plan.steps_per_epoch * self.plan.accum:
            self.epoch, self.micro_in_epoch = self.epoch + 1, 0
        log.info("resumed at step %d (epoch %d, micro-batch %d)", self.step, self.epoch, self.micro_in_epoch)

    # --- the loop ------------------------------------------------------------------------------------
    def collate(self, rows: list[dict]) -> dict:
        """One micro-batch of training rows as the step takes it: packed several samples to a row when
        ``train.packing`` (in one row under flash-attention, which reads one row's boundaries), else padded."""
        t = self.cfg.train
        if t.packing and len(rows) > 1:
            one_row = (getattr(self.model.lm.config, "_attn_implementation", None) or "").startswith("flash")
            budget = t.packing_budget or default_budget(self.cfg.model.max_length)
            return collate_packed(rows, self.model.pad_token_id, budget, one_row=one_row)
        return collate(rows, self.model.pad_token_id)

    def micro_batches(self, rows: Iterable[dict]) -> Iterator[dict]:
        """This rank's micro-batches: LLaVA's modality/length megabatches when ``group_by_modality_length``
        (one optimizer step = one megabatch of one modality), else the rows' own (shuffled) order."""
        t = self.cfg.train
        if t.group_by_modality_length:
            seed = t.seed * 1000 + self.epoch * 10 + self.rank
            groups = grouped_micro_batches(rows, t.micro_batch_size, self.plan.accum, seed)
        else:
            groups = in_order_micro_batches(rows, t.micro_batch_size)
        for group in groups:
            yield self.collate(group)

    def micro_step(self, batch: dict) -> float:
        """Forward and backward of one micro-batch; DeepSpeed steps the optimizer at the accumulation boundary."""
        feats = batch["image_features"]  # [M, N, Dv], a list of M per-image tensors, or None
        if self.model.vision_tower is not None:
            return self._pixel_step(batch)
        out = self.engine(
            input_ids=batch["input_ids"].to(self.device),
            attention_mask=batch["attention_mask"].to(self.device),
            labels=batch["labels"].to(self.device),
            image_features=image_features_to(feats, self.device),
            image_sizes=batch.get("image_sizes"),  # anyres: each image's (w, h), in the features' order
            **_packed(batch, self.device),
        )
        self.engine.backward(out.loss)
        self.engine.step()
        return float(out.loss.detach())

    def _pixel_step(self, batch: dict) -> float:
        """``micro_step`` of a run that reads the pixel store: the stored tiles become pixel values on the device
        and the tower runs inside the engine's forward (trained or frozen as ``freeze`` set it)."""
        tower, images = self.model.vision_tower, batch["image_features"]  # each image's [T_i, 3, S, S] tiles
        pixels, num_tiles = (tower_inputs(images, self.cfg.features.pixel_dtype, tower.mean, tower.std, self.device)
                             if images is not None else (None, None))
        out = self.engine(
            input_ids=batch["input_ids"].to(self.device),
            attention_mask=batch["attention_mask"].to(self.device),
            labels=batch["labels"].to(self.device),
            pixel_values=pixels,
            num_tiles=num_tiles,
            image_sizes=batch.get("image_sizes"),
            **_packed(batch, self.device),
        )
        self.engine.backward(out.loss)
        self.engine.step()
        return float(out.loss.detach())

    def train_epoch(self, rows: Iterable[dict], on_step: Callable[[dict], None]) -> None:
        """One epoch over this rank's rows; skips the micro-batches a resumed run already consumed."""
        plan, accum = self.plan, self.plan.accum
        per_epoch = plan.steps_per_epoch * accum
        stats = {"loss": 0.0, "tokens": 0, "positions": 0, "samples": 0, "wait": 0.0}
        t_step = time.perf_counter()
        it = self.micro_batches(rows)
        index = 0
        while index < per_epoch and self.step < plan.total_steps:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                raise RuntimeError(
                    f"rank {self.rank} ran out of data at micro-batch {index}/{per_epoch} of epoch {self.epoch}"
                ) from None
            stats["wait"] += time.perf_counter() - t0
            if index < self.micro_in_epoch:  # consumed before the restart
                index += 1
                continue
            stats["loss"] += self.micro_step(batch)
            index += 1
            self.micro_in_epoch = index
            stats["tokens"] += batch["num_tokens"]
            stats["positions"] += batch["num_positions"]
            stats["samples"] += batch.get("num_samples", batch["input_ids"].shape[0])  # packed: rows ≠ samples
            if index % accum == 0:
                self.step += 1
                elapsed = time.perf_counter() - t_step
                on_step(self._metrics(stats, elapsed))
                stats = {k: 0 if k != "loss" else 0.0 for k in stats}
                t_step = time.perf_counter()
        for _ in it:  # drain: every rank ends the epoch's stream together
            pass
        self.epoch += 1
        self.micro_in_epoch = 0

    def _metrics(self, stats: dict, elapsed: float) -> dict[str, float]:
        totals = torch.tensor([stats["loss"] / self.plan.accum, stats["tokens"], stats["samples"],
                               stats["positions"], stats["wait"]], dtype=torch.float64)
        if dist.is_initialized():
            dist.all_reduce(totals)
        loss, tokens, samples, positions, wait = totals.tolist()
        grad_norm = self.engine.get_global_grad_norm()
        metrics = {
            "loss": loss / self.world,
            "lr": self.engine.get_lr()[0],
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "samples_per_s": samples / elapsed,
            "tokens_per_s": tokens / elapsed,
            "data_wait_share": (wait / self.world) / elapsed,
            "padding_share": 1.0 - tokens / max(positions, 1),
            "step": self.step,
            "epoch": self.epoch,
        }
        peak = peak_flops()
        if peak:
            metrics["mfu"] = self.flops_per_token * tokens / elapsed / (peak * self.world)
        return metrics

    # --- the result ----------------------------------------------------------------------------------
    def save_model_folder(self, uri: str, fingerprint: dict) -> None:
        """The trained model's folder at ``uri`` (every rank calls it; rank 0 writes). A run that read pixels
        records its tower's feature fingerprint (``tower_weights: trained`` when the tower trained), not the
        pixel store's."""
        if self.model.vision_tower is not None:
            fingerprint = self.model.vision_tower.fingerprint()
        if self.lora:
            checkpoint.save_lora_model(self.model, self.tokenizer, self.cfg, self.feature_dim, fingerprint, uri,
                                       rank=self.rank, steps=self.step, trainable=self.trainable)
            return
        checkpoint.save_full_model(self.model, self.tokenizer, self.cfg, self.feature_dim, fingerprint, uri,
                                   rank=self.rank, steps=self.step,
                                   include_lm=self._lm_trains() or self._lm_not_rebuildable())

    def _lm_trains(self) -> bool:
        return "mm_language_model" in self.cfg.tunable_parts

    def _lm_not_rebuildable(self) -> bool:
        # an LM that came from an earlier folder (not by path) must be carried along
        return bool(self.init_meta and self.init_meta.get("lm", {}).get("included"))


def with_recipe(model: VisionLanguageModel, recipe: VisionRecipe | None, source: str) -> VisionLanguageModel:
    """The model loaded from ``train.init_from`` with the config's packing recipe.

    LLaVA-NeXT aligns its projector on one tile per image and finetunes on anyres tiles: a pad/crop folder
    under an anyres config keeps its projector and LM and gains the recipe and a freshly initialised
    ``image_newline`` (spatial_unpad). An anyres folder must pack as the config does.
    """
    if model.recipe == recipe:
        return model
    if model.recipe is not None:
        want = "one tile per image" if recipe is None else recipe
        raise ValueError(f"train.init_from={source} packs anyres tiles by {model.recipe}; model.vision asks for "
                         f"{want}: set model.vision as that folder was trained, or start from another folder")
    log.info("train.init_from=%s was trained on one tile per image: it now packs anyres tiles by %s%s", source,
             recipe, " with a new image_newline" if recipe.patch_merge == "spatial_unpad" else "")
    return VisionLanguageModel(model.projector, model.lm, model.image_token_id, pad_token_id=model.pad_token_id,
                               eos_token_id=list(model.eos_token_ids), recipe=recipe)


def run_loop(worker: Worker, epoch_rows: Callable[[int], Iterable[dict]], report: Callable[[dict, Path | None], None],
             restore: Path | None, fingerprint: dict, on_metrics: Callable[[dict], None] | None = None) -> dict:
    """The whole run of one worker: epochs of ``epoch_rows(epoch)``, checkpoints, then the model folder.

    ``report(metrics, checkpoint_dir)`` is Ray Train's report (or a local one); ``restore`` a checkpoint
    folder to resume from.
    """
    cfg, plan, rank, world = worker.cfg, worker.plan, worker.rank, worker.world
    resumed_from = None
    if restore is not None:
        worker.load_checkpoint(restore)
        resumed_from = worker.step
    fail_at = cfg.train.fail_at_step if restore is None else None
    last: dict = {}

    def on_step(metrics: dict) -> None:
        nonlocal last
        last = metrics
        if on_metrics and rank == 0 and (worker.step % cfg.train.log_every == 0 or worker.step == plan.total_steps):
            on_metrics(metrics)
        if worker.step % cfg.train.checkpoint_every == 0 and worker.step < plan.total_steps:
            with tempfile.TemporaryDirectory(prefix="vitune-ckpt-") as d:
                worker.save_checkpoint(Path(d))
                report(metrics, Path(d))
        if fail_at is not None and worker.step == fail_at and rank == world - 1:
            raise RuntimeError(f"injected failure at step {fail_at} (train.fail_at_step)")

    while worker.step < plan.total_steps:
        worker.train_epoch(epoch_rows(worker.epoch), on_step)
    worker.save_model_folder(layout.model_folder(cfg), fingerprint)
    final = dict(last, step=worker.step, resumed_from=resumed_from if resumed_from is not None else -1)
    with tempfile.TemporaryDirectory(prefix="vitune-ckpt-") as d:
        worker.save_checkpoint(Path(d))
        report(final, Path(d))
    return final
