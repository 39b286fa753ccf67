"""``vitune submit`` / ``vitune jobs``: send a jobs/ entrypoint to any Ray cluster and follow it (Job Submission API).

    vitune submit train --config tiny stage=align --address http://HEAD:8265
    vitune jobs list --address http://HEAD:8265          # or RAY_ADDRESS=http://HEAD:8265
    vitune jobs logs JOB_ID [--follow] | status JOB_ID | stop JOB_ID

Before anything is sent, the config is loaded here with the job's config class, so a bad override fails
fast with the field named. The job's runtime env ships the repository as its working dir (without .venv,
runs, caches, .git) and ``platform/vitune`` as a py_module, so the driver and every Ray worker run the
submitted code even where the cluster image holds an older install; the storage and tracking variables of
this shell (``FORWARD_ENV``) and ``--env K=V`` become the job's env vars. A submitted job joins the cluster
it runs on, so ``ray.address=null ray.num_cpus=null`` go before the user's overrides (a preset's local-Ray
sizing would make ``ray.init`` refuse to connect).

Token auth (Ray >= 2.52): the dashboard token is found the way Ray finds it — ``RAY_AUTH_TOKEN``, the file
named by ``RAY_AUTH_TOKEN_PATH``, then ``~/.ray/auth_token`` — and sent as ``Authorization: Bearer``. Ray's
client adds it only when this process itself runs with ``RAY_AUTH_MODE=token``; here it is sent whenever a
token is configured (a cluster without auth ignores the header).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shlex
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from pydantic import BaseModel

from vitune import storage
from vitune.config import (
    ConfigError,
    EvalJobConfig,
    FeaturesJobConfig,
    GenerateJobConfig,
    TrainJobConfig,
    load_config,
)

log = logging.getLogger(__name__)

# jobs/<name>.py → the config class its entrypoint loads (pipeline: one per step, see validate_job)
JOB_CONFIGS: dict[str, type[BaseModel] | None] = {
    "extract_features": FeaturesJobConfig,
    "train": TrainJobConfig,
    "evaluate": EvalJobConfig,
    "generate_instructions": GenerateJobConfig,
    "pipeline": None,
}

# variables of the submitting shell that a job needs to reach the same storage and tracking
FORWARD_ENV = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_S3_ENDPOINT_URL",
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
)

# never uploaded with the working dir (Ray also honours .gitignore; these hold even without one)
EXCLUDES = [
    ".git", ".venv", "venv", "runs", "demo-output", "mlruns", "mlflow.db", "__pycache__", "*.pyc",
    ".pytest_cache", ".ruff_cache", ".mypy_cache", "*.egg-info", "node_modules",
]

# a submitted job joins the cluster it runs on (RAY_ADDRESS, set by Ray): a preset's local-Ray settings would
# make ray.init() refuse ("num_cpus ... must not be provided" when connecting); the user's overrides still win
CLUSTER_OVERRIDES = ("ray.address=null", "ray.num_cpus=null")


class SubmitError(RuntimeError):
    """A submission that cannot go ahead; the message says why and what to do."""


# --- what to run -------------------------------------------------------------------------------------


def find_repo_root(start: str | Path | None = None) -> Path:
    """The repository root: the first folder upwards from ``start`` (default: cwd) that holds jobs/_common.py."""
    here = Path(start or os.getcwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "jobs" / "_common.py").is_file():
            return folder
    pkg_root = Path(__file__).resolve().parents[3]  # platform/vitune/cli/submit.py → repository root
    if (pkg_root / "jobs" / "_common.py").is_file():
        return pkg_root
    raise SubmitError(f"no vitune repository (a folder with jobs/_common.py) at or above {here}; "
                      "run from the repository or pass --working-dir")


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
    if job in JOB_CONFIGS:
        return f"jobs/{job}.py", job
    if not job.endswith(".py"):
        raise SubmitError(f"unknown job {job!r}: use one of {', '.join(JOB_CONFIGS)} or a path to a .py file")
    script = _local_file(job, root, "job script")
    return _inside(script, root, "job script"), script.stem


@dataclass(frozen=True)
class ConfigRef:
    local: str  # what this machine reads to validate
    remote: str  # what the job's entrypoint names (relative to its working dir, or a URI)


def resolve_config(config: str, root: Path) -> ConfigRef:
    if "://" in config:
        return ConfigRef(config, config)
    path = _local_file(config, root, "config")
    return ConfigRef(str(path), _inside(path, root, "config"))


def split_steps(overrides: Sequence[str]) -> tuple[list[str] | None, list[str]]:
    """The pipeline's ``steps=a,b`` (as jobs/pipeline.py reads it) apart from the config overrides."""
    steps, rest = None, []
    for item in overrides:
        if item.startswith("steps="):
            steps = [s for s in item.split("=", 1)[1].split(",") if s]
        else:
            rest.append(item)
    return steps, rest


def validate_job(job: str, config: str, overrides: Sequence[str]) -> list[BaseModel]:
    """Load ``config`` + ``overrides`` as job ``job`` will; raises ``ConfigError`` naming the field.

    Returns the loaded configs (the pipeline: one per step); an unknown job (a custom script) is not checked.
    """
    if job == "pipeline":
        from vitune.pipeline import STEPS

        steps, rest = split_steps(overrides)
        steps = list(STEPS) if steps is None else steps
        unknown = [s for s in steps if s not in STEPS]
        if unknown:
            raise ConfigError(f"steps: unknown pipeline steps {unknown}; valid steps: {', '.join(STEPS)}")
        cfgs: list[BaseModel] = [load_config(FeaturesJobConfig, config, rest)]
        for step in steps:
            if step in ("align", "finetune"):
                cfgs.append(load_config(TrainJobConfig, config, [*rest, f"stage={step}"]))
            elif step == "eval":
                cfgs.append(load_config(EvalJobConfig, config, rest))
        return cfgs
    cls = JOB_CONFIGS.get(job)
    if cls is None:
        log.warning("%s is not a vitune job entrypoint: its config is not validated before submission", job)
        return []
    return [load_config(cls, config, overrides)]


def warn_local_storage(cfgs: Sequence[BaseModel]) -> None:
    """A relative local storage root lands in the job's temporary working dir on the head node only."""
    for root in sorted({c.storage.root for c in cfgs if hasattr(c, "storage")}):
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


def job_env(environ: Mapping[str, str], extra: Mapping[str, str]) -> dict[str, str]:
    """The forwarded variables that are set here, then ``--env`` pairs (which win)."""
    env = {k: environ[k] for k in FORWARD_ENV if environ.get(k)}
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


# --- talking to the cluster --------------------------------------------------------------------------


def auth_token(environ: Mapping[str, str] | None = None) -> str | None:
    """The Ray auth token, in Ray's order: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH's file, ~/.ray/auth_token."""
    environ = os.environ if environ is None else environ
    if environ.get("RAY_AUTH_TOKEN", "").strip():
        return environ["RAY_AUTH_TOKEN"].strip()
    if environ.get("RAY_AUTH_TOKEN_PATH"):
        path = Path(environ["RAY_AUTH_TOKEN_PATH"]).expanduser()
        try:
            token = path.read_text().strip()
        except OSError as exc:
            raise SubmitError(f"RAY_AUTH_TOKEN_PATH={path} cannot be read: {exc}") from None
        if not token:
            raise SubmitError(f"RAY_AUTH_TOKEN_PATH={path} is empty")
        return token
    default = (Path(environ["HOME"]) if environ.get("HOME") else Path.home()) / ".ray" / "auth_token"
    if default.is_file():
        return default.read_text().strip() or None
    return None


def dashboard_url(address: str | None, environ: Mapping[str, str] | None = None) -> str:
    """The dashboard URL from ``--address`` or RAY_ADDRESS; ``host:port`` gets ``http://``."""
    environ = os.environ if environ is None else environ
    address = address or environ.get("RAY_ADDRESS")
    if not address:
        raise SubmitError("no cluster: pass --address http://HEAD:8265 (the dashboard) or set RAY_ADDRESS")
    return address if "://" in address else f"http://{address}"


@contextlib.contextmanager
def _only_this_address(address: str) -> Iterator[None]:
    # JobSubmissionClient lets RAY_API_SERVER_ADDRESS / RAY_ADDRESS override the address it is given; an
    # explicit --address must win, so both are pinned to it while the client resolves its address.
    saved = {k: os.environ.get(k) for k in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")}
    os.environ["RAY_API_SERVER_ADDRESS"] = address
    os.environ.pop("RAY_ADDRESS", None)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def connect(address: str | None, environ: Mapping[str, str] | None = None):
    """A ``JobSubmissionClient`` for the dashboard at ``address``, carrying the auth token if one is set."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    url = dashboard_url(address, environ)
    token = auth_token(environ)
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        with _only_this_address(url):
            return JobSubmissionClient(url, headers=headers)
    except (AuthenticationError, ConnectionError, RuntimeError, ValueError) as exc:
        if isinstance(exc, AuthenticationError):
            found = "the token sent was refused" if token else "no token found here"
            raise SubmitError(f"the Ray dashboard at {url} requires token auth and {found}: set RAY_AUTH_TOKEN, or "
                              "RAY_AUTH_TOKEN_PATH to a file holding the cluster's token (or ~/.ray/auth_token)"
                              ) from None
        raise SubmitError(f"cannot use the Ray dashboard at {url}: {exc}") from None


def wait_until_done(client, job_id: str, poll_s: float = 1.0):
    """Poll until the job reaches a terminal status; returns it."""
    while True:
        status = client.get_job_status(job_id)
        if status.is_terminal():
            return status
        time.sleep(poll_s)


def follow(client, job_id: str, out: TextIO | None = None):
    """Stream the job's logs to ``out`` until it ends; returns its terminal status."""
    out = out or sys.stdout

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(tail())
    except RuntimeError as exc:  # the stream can drop (head restart, proxy timeout); the status still tells
        log.warning("log stream of %s ended early (%s); waiting for its status", job_id, exc)
    return wait_until_done(client, job_id)


def report(client, job_id: str, status) -> int:
    """Write the final status (and the failure message); 0 for SUCCEEDED, 1 otherwise."""
    line = f"job {job_id} {status.value}"
    if status.value != "SUCCEEDED":
        message = (client.get_job_info(job_id).message or "").strip()
        if message:
            line += f": {message.splitlines()[-1]}"
    sys.stdout.write(line + "\n")
    return 0 if status.value == "SUCCEEDED" else 1


# --- the commands ------------------------------------------------------------------------------------


def submit_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vitune submit", description="Submit a jobs/ entrypoint to a Ray cluster.")
    p.add_argument("job", help=f"{' | '.join(JOB_CONFIGS)}, or a path to a script in the repository")
    p.add_argument("overrides", nargs="*", help="key.sub=value config overrides (pipeline: also steps=a,b)")
    p.add_argument("--config", required=True, help="preset YAML in the repository (e.g. tiny) "
                                                   "or an s3:// URI")
    p.add_argument("--address", help="the cluster's dashboard, http://HEAD:8265 (default: RAY_ADDRESS)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="an env var of the job")
    p.add_argument("--pip", action="append", default=[], metavar="PKG", help="a pip requirement for the job")
    p.add_argument("--no-wait", action="store_true", help="return once submitted instead of following the logs")
    p.add_argument("--submission-id", help="the job's id (default: generated by Ray)")
    p.add_argument("--entrypoint-num-cpus", type=float, help="CPUs reserved for the driver (default 0)")
    p.add_argument("--entrypoint-num-gpus", type=float, help="GPUs reserved for the driver (default 0)")
    p.add_argument("--working-dir", help="the repository root to upload (default: found from the cwd)")
    return p


def main_submit(argv: Sequence[str] | None = None) -> int:
    """``vitune submit``; returns 0 when the job SUCCEEDED (or was submitted with --no-wait)."""
    args = submit_parser().parse_intermixed_args(list(sys.argv[1:] if argv is None else argv))
    try:
        root = find_repo_root(args.working_dir)
        script, name = resolve_job(args.job, root)
        config = resolve_config(args.config, root)
        overrides = [*CLUSTER_OVERRIDES, *args.overrides] if name in JOB_CONFIGS else list(args.overrides)
        cfgs = validate_job(name, config.local, overrides)
        warn_local_storage(cfgs)
        entrypoint = build_entrypoint(script, config.remote, overrides)
        runtime_env = build_runtime_env(root, job_env(os.environ, parse_env(args.env)), args.pip)
        client = connect(args.address)
        job_id = client.submit_job(
            entrypoint=entrypoint, runtime_env=runtime_env, submission_id=args.submission_id,
            metadata={"vitune.job": name, "vitune.config": config.remote},
            entrypoint_num_cpus=args.entrypoint_num_cpus, entrypoint_num_gpus=args.entrypoint_num_gpus)
    except (ConfigError, SubmitError) as exc:
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


def jobs_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--address", help="the cluster's dashboard, http://HEAD:8265 (default: RAY_ADDRESS)")
    p = argparse.ArgumentParser(prog="vitune jobs", description="List, follow or stop jobs on a Ray cluster.")
    sub = p.add_subparsers(dest="action", required=True)
    sub.add_parser("list", parents=[common], help="the cluster's jobs, oldest first")
    status = sub.add_parser("status", parents=[common], help="a job's status")
    status.add_argument("job_id")
    logs = sub.add_parser("logs", parents=[common], help="a job's logs")
    logs.add_argument("job_id")
    logs.add_argument("--follow", "-f", action="store_true", help="stream until the job ends; exit 0 iff it succeeded")
    stop = sub.add_parser("stop", parents=[common], help="stop a job")
    stop.add_argument("job_id")
    stop.add_argument("--wait", action="store_true", help="wait until it has stopped")
    return p


def _format_time(ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else "-"


def list_jobs(client, out: TextIO) -> None:
    jobs = sorted(client.list_jobs(), key=lambda j: j.start_time or 0)
    rows = [(j.submission_id or j.job_id or "-", j.status.value, _format_time(j.start_time), j.entrypoint or "")
            for j in jobs]
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(("ID", "STATUS", "STARTED"))]
    out.write(f"{'ID':<{widths[0]}}  {'STATUS':<{widths[1]}}  {'STARTED':<{widths[2]}}  ENTRYPOINT\n")
    for r in rows:
        out.write(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]}\n")


def main_jobs(argv: Sequence[str] | None = None) -> int:
    """``vitune jobs list|status|logs|stop``."""
    args = jobs_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        client = connect(args.address)
        if args.action == "list":
            list_jobs(client, sys.stdout)
        elif args.action == "status":
            sys.stdout.write(f"{client.get_job_status(args.job_id).value}\n")
        elif args.action == "logs":
            if args.follow:
                return report(client, args.job_id, follow(client, args.job_id))
            sys.stdout.write(client.get_job_logs(args.job_id))
        else:
            stopped = client.stop_job(args.job_id)
            if args.wait:
                wait_until_done(client, args.job_id)
            sys.stdout.write(f"job {args.job_id} {'stopping' if stopped else 'was not running'}\n")
    except SubmitError as exc:
        log.error("%s", exc)
        return 2
    except RuntimeError as exc:  # the SDK's errors: unknown job id, HTTP failures
        log.error("%s", exc)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0
