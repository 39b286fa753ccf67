"""`vitune merge MODEL OUT`: fold a LoRA model folder's adapter into full weights, written as an ordinary folder.

MODEL is a LoRA model folder URI, `runs:/<run id>` or `models:/NAME/VERSION`; OUT a local folder or `s3://`
prefix. The result holds the merged LM (W + scale·B·A in each adapted layer) under `lm/`, the projector and the
tokenizer, like a full finetune's folder: `vitune export OUT OUT-hf` then writes the llava-hf layout, and
serving or evaluation load it without peft. (`vitune export` of the LoRA folder itself merges on the fly.)

    vitune merge s3://bucket/runs/train/finetune/model ./merged
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

log = logging.getLogger(__name__)


def merge_model_folder(source: str, out: str, tracking_uri: str | None = None) -> dict[str, Any]:
    """Merge the LoRA folder at ``source`` into ``out``; returns the new folder's meta. A folder without an
    adapter is refused (there is nothing to merge)."""
    # deferred: torch, transformers and peft take seconds to import; `vitune merge --help` should not wait
    from vitune.config import ModelConfig
    from vitune.model.folder import load_model_folder, read_meta, save_model_folder
    from vitune.model.lora import merge_lora
    from vitune.references import model_folder

    with model_folder(source, tracking_uri=tracking_uri) as folder:
        meta = read_meta(folder)
        if not meta["lm"].get("adapter"):
            raise ValueError(f"{source} holds no LoRA adapter; there is nothing to merge")
        model, tokenizer, meta = load_model_folder(folder)
    merge_lora(model)
    extra = {**meta.get("extra", {}), "merged_from": source, "base_lm": meta["lm"]["source"]}
    save_model_folder(model, tokenizer, ModelConfig.model_validate(meta["model"]), meta["fingerprint"], out,
                      include_lm=True, extra=extra)
    log.info("merged the adapter of %s over %s into %s", source, meta["lm"]["source"], out)
    return read_meta(out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vitune merge", description=__doc__.splitlines()[0],
                                epilog="example: vitune merge ./runs/tiny/train/finetune/model ./merged && "
                                       "vitune export ./merged ./merged-hf")
    p.add_argument("model", help="LoRA model folder URI, runs:/<run id> or models:/NAME/VERSION")
    p.add_argument("out", help="output model folder: local path or s3:// prefix")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI for runs:/ and models:/ (default: "
                   "MLFLOW_TRACKING_URI)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Parse `argv` (without the `merge` word), merge, and print the output URI."""
    args = build_parser().parse_args(argv)
    try:
        merge_model_folder(args.model, args.out, args.tracking_uri)
    except (ValueError, FileNotFoundError) as exc:
        sys.stderr.write(f"vitune merge: {exc}\n")
        return 2
    sys.stdout.write(f"{args.out}\n")
    return 0
