"""`vitune export MODEL OUT --format llava-hf`: a trained model in a layout other tools load.

MODEL is a model folder URI, `runs:/<run id>` or `models:/NAME/VERSION`; OUT a local folder or `s3://` prefix.
The result loads with `LlavaForConditionalGeneration.from_pretrained(OUT)` and `AutoProcessor.from_pretrained(OUT)`
without vitune, and serves with vLLM or SGLang (`vitune.model.export` says what it holds).
"""

from __future__ import annotations

import argparse
import sys

DTYPES = ("float32", "bfloat16", "float16")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vitune export", description=__doc__.splitlines()[0])
    p.add_argument("model", help="model folder URI, runs:/<run id> or models:/NAME/VERSION")
    p.add_argument("out", help="output folder: local path or s3:// prefix")
    p.add_argument("--format", default="llava-hf", choices=("llava-hf",), help="the output layout")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="cast the weights (default: keep the model folder's dtype, which computes exactly what "
                        "vitune computes; bfloat16/float16 halve the size for serving)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI for runs:/ and models:/ (default: "
                   "MLFLOW_TRACKING_URI)")
    p.add_argument("--max-shard-gb", type=float, default=5.0, help="largest safetensors shard, in GiB")
    return p


def main(argv: list[str] | None = None) -> int:
    """Parse `argv` (without the `export` word), export, and print the output URI."""
    args = build_parser().parse_args(argv)
    # deferred: torch and transformers take seconds to import, `vitune export --help` should not wait
    from vitune.model.export import export_llava_hf
    from vitune.references import model_folder

    try:
        with model_folder(args.model, tracking_uri=args.tracking_uri) as folder:
            out = export_llava_hf(folder, args.out, dtype=args.dtype, max_shard_bytes=int(args.max_shard_gb * 1024**3))
    except (ValueError, FileNotFoundError) as exc:  # a model the layout cannot hold, or no model there
        sys.stderr.write(f"vitune export: {exc}\n")
        return 2
    sys.stdout.write(f"{out}\n")
    return 0
