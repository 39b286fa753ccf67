"""``vitune submit``: send a jobs/ entrypoint to any Ray cluster (Job Submission API) and follow it to its end.

    vitune submit train --config tiny stage=align --address http://HEAD:8265
    vitune submit pipeline --config my/preset.yaml steps=features,align      # a YAML inside the repository

Before anything is sent, the config is loaded here with the job's config class, so a bad override fails
fast with the field named. A preset name (``tiny``) is sent as it is: the job resolves it from the package it
runs; a YAML path is sent relative to the working dir (it must lie inside it), a URI as it is. The job's runtime
env ships the repository (found by cli/repo.py) as its working dir (without .venv, runs, caches, .git) and
``platform/vitune`` as a py_module, so the driver and every Ray worker run the submitted code and presets even
where the cluster image holds an older install; the storage and tracking variables of this shell
(``FORWARD_ENV``) and ``--env K=V`` become the job's env vars. AWS credentials are not among them unless
``--forward-aws-credentials`` asks (``CREDENTIAL_ENV``): a job's env is readable from the cluster's job list.
The upload leaves out ``.env`` files and ``*.pem`` / ``*.key`` files (``EXCLUDES``). A submitted job joins
the cluster it runs on, so ``ray.address=null ray.num_cpus=null`` go before the user's overrides (a
preset's local-Ray sizing would make ``ray.init`` refuse to connect). Connecting, the token and following
the logs: cli/cluster.py.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vitune import catalog, storage
from vitune.cli.cluster import ClusterError, connect, follow, report
from vitune.cli.repo import RepositoryNotFound, find_repo_root
from vitune.config import ConfigError, JobConfig, load_config, resolve_preset
from vitune.pipeline import split_steps, step_configs

log = logging.getLogger(__name__)

# variables of the submitting shell that a job needs to reach the same storage and tracking (no secrets)
FORWARD_ENV = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_S3_ENDPOINT_URL",
    "AWS_ENDPOINT_URL",
    "AWS_DEFAULT_REGION",
)
# this shell's AWS credentials: forwarded only with --forward-aws-credentials. A job's env vars are part of its
# runtime env, which the dashboard and `ray job` show to whoever can reach the cluster; the nodes should get
# their own (an instance role, IRSA on EKS, or a Kubernetes Secret in the pod env). The key id goes with the
# secret or not at all: botocore refuses a key id without its secret.
CREDENTIAL_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
)

# never uploaded with the working dir (Ray also honours .gitignore; these hold even without one): build and run
# outputs, and files that commonly hold secrets (dotenv files, private keys and certificates)
EXCLUDES = [
    ".git", ".venv", "venv", "runs", "demo-output", "mlruns", "mlflow.db", "__pycache__", "*.pyc",
    ".pytest_cache", ".ruff_cache", ".mypy_cache", "*.egg-info", "node_modules",
    ".env", ".env.*", "*.pem", "*.key",
]

# a submitted job joins the cluster it runs on (RAY_ADDRESS, set by Ray): a preset's local-Ray settings would
# make ray.init() refuse ("num_cpus ... must not be provided" when connecting); the user's overrides still win
CLUSTER_OVERRIDES = ("ray.address=null", "ray.num_cpus=null")


class SubmitError(RuntimeError):
    """A submission that cannot go ahead; the message says why and what to do."""


# --- what to run --------------------------------------------------------------------------------------


def _inside(path: Path, root: Path, what: str) -> str:
    try:
        return path.resolve().relative_to(root).as_posix()
    except ValueError:
        raise SubmitError(f"{what} {path} is outside the working dir {root}: the cluster would not see it "
                          "(move it under the repository, or use an s3:// URI for a config)") from None


def _local_file(name: str, root: Path, what: str) -> Path:
    for candidate in (Path(name), root / name):
        if candidate.is_file():
            return candidate
    raise SubmitError(f"{what} {name!r} not found (looked in {os.getcwd()} and {root})")


def resolve_job(job: str, root: Path) -> tuple[str, str]:
    """``(script path relative to root, job name)`` for a jobs/ name (``train``) or a path to a script."""
    if job in catalog.JOBS:
        if not (root / "jobs" / f"{job}.py").is_file():
            raise SubmitError(f"jobs/{job}.py not found in the working dir {root}: is it a vitune checkout?")
        return f"jobs/{job}.py", job
    if not job.endswith(".py"):
        raise SubmitError(f"unknown job {job!r}: use one of {', '.join(catalog.JOBS)} or a path to a .py file")
    script = _local_file(job, root, "job script")
    return _inside(script, root, "job script"), script.stem


@dataclass(frozen=True)
class ConfigRef:
    local: str  # what this machine reads to validate
    remote: str  # what the job's entrypoint names (relative to its working dir, or a URI)


def resolve_config(config: str, root: Path) -> ConfigRef:
    """A URI or a preset name as it is (an unknown name fails here); a YAML file relative to ``root``."""
    if "://" in config or resolve_preset(config) != config:
        return ConfigRef(config, config)
    path = _local_file(config, root, "config")
    return ConfigRef(str(path), _inside(path, root, "config"))


def validate_job(job: str, config: str, overrides: Sequence[str]) -> list[JobConfig]:
    """Load ``config`` + ``overrides`` as job ``job`` will; raises ``ConfigError`` naming the field.

    Returns the loaded configs (the pipeline: each step's, then its own); a custom script is not checked.
    """
    if job not in catalog.JOBS:
        log.warning("%s is not a vitune job entrypoint: its config is not validated before submission", job)
        return []
    spec = catalog.JOBS[job]
    if spec.config is None:  # the pipeline, loaded as run_pipeline loads it
        steps, rest = split_steps(overrides)
        return [*step_configs(config, rest, steps).values(), load_config(JobConfig, config, rest)]
    return [load_config(catalog.load(spec.config), config, overrides)]


def warn_local_storage(cfgs: Sequence[JobConfig]) -> None:
    """A relative local storage root lands in the job's temporary working dir on the head node only."""
    for root in sorted({c.storage.root for c in cfgs}):
        if not storage.is_remote(root) and not os.path.isabs(root):
            log.warning("storage.root=%s is a relative local path: on a cluster it lands in the job's temporary "
                        "working dir on one node; use s3://... (or an absolute path every node shares)", root)


def build_entrypoint(script: str, config: str, overrides: Sequence[str]) -> str:
    return shlex.join(["python", script, "--config", config, *overrides])


def parse_env(pairs: Sequence[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SubmitError(f"--env {pair!r} is not of the form KEY=VALUE")
        out[key] = value
    return out


def job_env(environ: Mapping[str, str], extra: Mapping[str, str], forward_credentials: bool = False) -> dict[str, str]:
    """The forwarded variables that are set here (credentials only when asked), then ``--env`` pairs (which win)."""
    names = FORWARD_ENV + CREDENTIAL_ENV if forward_credentials else FORWARD_ENV
    env = {k: environ[k] for k in names if environ.get(k)}
    held = [k for k in CREDENTIAL_ENV if environ.get(k) and k not in extra]
    if held and not forward_credentials:
        log.info("this shell's %s are not sent with the job: the cluster's nodes use their own credentials (instance "
                 "role, IRSA, a Kubernetes Secret); --forward-aws-credentials sends them", ", ".join(held))
    shown = sorted(k for k in env if k in CREDENTIAL_ENV)
    if shown:
        log.warning("the job's env carries %s: anyone who can read the cluster's job list (dashboard, `ray job`) "
                    "can read them", ", ".join(shown))
    env.update(extra)
    return env


def build_runtime_env(root: Path, env_vars: Mapping[str, str], pip: Sequence[str]) -> dict[str, Any]:
    runtime_env: dict[str, Any] = {"working_dir": str(root), "excludes": list(EXCLUDES)}
    package = root / "platform" / "vitune"
    if package.is_dir():
        runtime_env["py_modules"] = [str(package)]
    if env_vars:
        runtime_env["env_vars"] = dict(env_vars)
    if pip:
        runtime_env["pip"] = list(pip)
    return runtime_env


# --- the command --------------------------------------------------------------------------------------


def submit_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vitune submit", description="Submit a jobs/ entrypoint to a Ray cluster.")
    p.add_argument("job", help=f"{' | '.join(catalog.JOBS)}, or a path to a script in the repository")
    p.add_argument("overrides", nargs="*", help="key.sub=value config overrides (pipeline: also steps=a,b)")
    p.add_argument("--config", required=True, help="a preset name (tiny, llava-v1.5-7b, ...), a YAML file in "
                                                   "the repository, or an s3:// URI")
    p.add_argument("--address", help="the cluster's dashboard, http://HEAD:8265 (default: RAY_ADDRESS)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="an env var of the job")
    p.add_argument("--forward-aws-credentials", action="store_true",
                   help="send this shell's AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN as job env "
                        "vars (visible in the job's info); default: the nodes use their own (instance role, IRSA)")
    p.add_argument("--pip", action="append", default=[], metavar="PKG", help="a pip requirement for the job")
    p.add_argument("--no-wait", action="store_true", help="return once submitted instead of following the logs")
    p.add_argument("--submission-id", help="the job's id (default: generated by Ray)")
    p.add_argument("--entrypoint-num-cpus", type=float, help="CPUs reserved for the driver (default 0)")
    p.add_argument("--entrypoint-num-gpus", type=float, help="GPUs reserved for the driver (default 0)")
    p.add_argument("--working-dir", help="the repository root to upload (default: found from the cwd, else the "
                                         "checkout vitune is installed from)")
    return p


def main_submit(argv: Sequence[str] | None = None) -> int:
    """``vitune submit``; returns 0 when the job SUCCEEDED (or was submitted with --no-wait)."""
    args = submit_parser().parse_intermixed_args(list(sys.argv[1:] if argv is None else argv))
    try:
        root = Path(args.working_dir).resolve() if args.working_dir else find_repo_root()
        script, name = resolve_job(args.job, root)
        config = resolve_config(args.config, root)
        overrides = [*CLUSTER_OVERRIDES, *args.overrides] if name in catalog.JOBS else list(args.overrides)
        cfgs = validate_job(name, config.local, overrides)
        warn_local_storage(cfgs)
        entrypoint = build_entrypoint(script, config.remote, overrides)
        env = job_env(os.environ, parse_env(args.env), args.forward_aws_credentials)
        runtime_env = build_runtime_env(root, env, args.pip)
        client = connect(args.address)
        job_id = client.submit_job(
            entrypoint=entrypoint, runtime_env=runtime_env, submission_id=args.submission_id,
            metadata={"vitune.job": name, "vitune.config": config.remote},
            entrypoint_num_cpus=args.entrypoint_num_cpus, entrypoint_num_gpus=args.entrypoint_num_gpus)
    except (ConfigError, SubmitError, ClusterError, RepositoryNotFound) as exc:
        log.error("%s", exc)
        return 2
    log.info("submitted %s: %s", job_id, entrypoint)
    sys.stdout.write(f"{job_id}\n")
    sys.stdout.flush()
    if args.no_wait:
        log.info("follow it with: vitune jobs logs %s --follow --address %s", job_id, client.get_address())
        return 0
    try:
        status = follow(client, job_id)
    except KeyboardInterrupt:
        log.warning("stopped following; the job goes on (vitune jobs stop %s --address %s)", job_id,
                    client.get_address())
        return 130
    return report(client, job_id, status)
