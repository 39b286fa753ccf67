"""The ``vitune`` command line: data tools, the demo, job submission to Ray clusters, and model export.

It works from any directory: the demo runs from the installed package (presets, the Serve application);
``submit`` finds the repository it uploads from the cwd, else the checkout vitune is installed from.
"""

from __future__ import annotations

import argparse
import sys

from vitune import catalog, progress


def _setup_logging(verbose: bool) -> None:
    """vitune's lines and progress on the terminal; Ray's own logs to a file unless ``-v`` (vitune.progress)."""
    progress.setup_console(verbose)


# Each command imports its module when it runs (deferred on purpose): they pull in Ray, torch or pyarrow,
# and `vitune --help` should answer at once.
def _cmd_synth(args: argparse.Namespace) -> int:
    from vitune.data import synthetic

    out = synthetic.generate(args.output, seed=args.seed, num_images=args.num_images,
                             num_eval_images=args.num_eval_images, image_size=args.image_size)
    for name, uri in out["records"].items():
        sys.stdout.write(f"{name}: {uri}\n")
    return 0


def _cmd_inspect(args: argparse.Namespace, rest: list[str]) -> int:
    from vitune.data import inspect as inspect_data

    return inspect_data.main(rest)


def _cmd_demo(args: argparse.Namespace, rest: list[str]) -> int:
    from vitune.cli import demo

    return demo.main(rest)


def _cmd_submit(args: argparse.Namespace, rest: list[str]) -> int:
    from vitune.cli import submit

    return submit.main_submit(rest)


def _cmd_jobs(args: argparse.Namespace, rest: list[str]) -> int:
    from vitune.cli import cluster

    return cluster.main_jobs(rest)


# `vitune features|train|evaluate|generate|pipeline` run the jobs of jobs/*.py here (same parsing, same summary);
# which subcommand runs which job is its entry in vitune.catalog.JOBS
def _cmd_job(args: argparse.Namespace, rest: list[str]) -> int:
    from vitune.cli import jobs

    if args.job == "evaluate" and rest[:1] == ["--compare"]:  # two results side by side, no job run
        from vitune.evaluation import compare

        return compare.main(rest[1:])
    spec = catalog.job(args.job)
    example = " ".join(["vitune", spec.command, "--config", "tiny", *([spec.example] if spec.example else [])])
    return jobs.main(args.job, rest, f"vitune {spec.command}: {spec.help}.\n\nexample: {example}",
                     prog=f"vitune {spec.command}")


def _cmd_serve(args: argparse.Namespace, rest: list[str]) -> int:
    from vitune.cli import serve

    return serve.main(rest)


def _cmd_models(args: argparse.Namespace, rest: list[str]) -> int:
    from vitune.cli import models

    return models.main(rest)


def _cmd_export(args: argparse.Namespace, rest: list[str]) -> int:
    from vitune.cli import export

    return export.main(rest)


def _cmd_merge(args: argparse.Namespace, rest: list[str]) -> int:
    from vitune.cli import merge

    return merge.main(rest)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vitune", description=__doc__.splitlines()[0])
    p.add_argument("-v", "--verbose", action="store_true",
                   help="show Ray's own logs on the terminal too (by default they go to files)")
    sub = p.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="data tools").add_subparsers(dest="data_command", required=True)
    synth = data.add_parser("synth", help="write the deterministic synthetic shapes dataset")
    synth.add_argument("output", help="local folder or s3:// URI")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--num-images", type=int, default=64)
    synth.add_argument("--num-eval-images", type=int, default=16)
    synth.add_argument("--image-size", type=int, default=64)
    synth.set_defaults(func=_cmd_synth)
    inspect = data.add_parser("inspect", help="render samples with trained spans marked, and token stats",
                              add_help=False)
    inspect.set_defaults(func=_cmd_inspect, passthrough=True)

    for name, func, help_ in (
        ("demo", _cmd_demo, "the whole pipeline on local Ray with tiny presets"),
        ("submit", _cmd_submit, "submit a job entrypoint to a Ray cluster"),
        ("jobs", _cmd_jobs, "list, follow or stop submitted jobs"),
        ("export", _cmd_export, "write a model folder in the llava-hf layout (transformers, vLLM, SGLang)"),
        ("serve", _cmd_serve, "serve a model folder or models:/NAME/VERSION (OpenAI API + chat page) on local Ray"),
        ("models", _cmd_models, "list registered models and versions with their evaluation scores"),
        ("merge", _cmd_merge, "fold a LoRA folder's adapter into full weights (e.g. vitune merge LORA_FOLDER OUT)"),
    ):
        sp = sub.add_parser(name, help=help_, add_help=False)
        sp.set_defaults(func=func, passthrough=True)
    for name, spec in catalog.JOBS.items():
        sp = sub.add_parser(spec.command, help=spec.help + " (locally; `vitune submit` sends it to a cluster)",
                            add_help=False)
        sp.set_defaults(func=_cmd_job, passthrough=True, job=name)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if getattr(args, "passthrough", False) and {"-v", "--verbose"} & set(rest):  # `vitune demo -v` works too
        args.verbose, rest = True, [a for a in rest if a not in ("-v", "--verbose")]
    if not {"-h", "--help"} & set(argv):  # help only prints: no logging set up (nor Ray's log file chosen)
        _setup_logging(args.verbose)
    if getattr(args, "passthrough", False):
        return int(args.func(args, rest) or 0)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
