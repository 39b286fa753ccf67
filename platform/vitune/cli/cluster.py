"""The cluster's Job API from this shell: connecting (with the token, as Ray finds it), following a job's logs
to its end, and the `vitune jobs list|status|logs|stop` command. `vitune submit` (cli/submit.py) sends jobs
through the same client.

    vitune jobs list --address http://HEAD:8265          # or RAY_ADDRESS=http://HEAD:8265
    vitune jobs logs JOB_ID [--follow] | status JOB_ID | stop JOB_ID [--wait]

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
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TextIO

from ray.exceptions import AuthenticationError
from ray.job_submission import JobStatus, JobSubmissionClient

log = logging.getLogger(__name__)


class ClusterError(RuntimeError):
    """The cluster cannot be reached or used as asked; the message says why and what to do."""


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
            raise ClusterError(f"RAY_AUTH_TOKEN_PATH={path} cannot be read: {exc}") from None
        if not token:
            raise ClusterError(f"RAY_AUTH_TOKEN_PATH={path} is empty")
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
        raise ClusterError("no cluster: pass --address http://HEAD:8265 (the dashboard) or set RAY_ADDRESS")
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


def connect(address: str | None, environ: Mapping[str, str] | None = None) -> JobSubmissionClient:
    """A ``JobSubmissionClient`` for the dashboard at ``address``, carrying the auth token if one is set."""
    url = dashboard_url(address, environ)
    token = auth_token(environ)
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        with _only_this_address(url):
            return JobSubmissionClient(url, headers=headers)
    except (AuthenticationError, ConnectionError, RuntimeError, ValueError) as exc:
        if isinstance(exc, AuthenticationError):
            found = "the token sent was refused" if token else "no token found here"
            raise ClusterError(f"the Ray dashboard at {url} requires token auth and {found}: set RAY_AUTH_TOKEN, or "
                               "RAY_AUTH_TOKEN_PATH to a file holding the cluster's token (or ~/.ray/auth_token)"
                               ) from None
        raise ClusterError(f"cannot use the Ray dashboard at {url}: {exc}") from None


def wait_until_done(client: JobSubmissionClient, job_id: str, poll_s: float = 1.0) -> JobStatus:
    """Poll until the job reaches a terminal status; returns it."""
    while True:
        status = client.get_job_status(job_id)
        if status.is_terminal():
            return status
        time.sleep(poll_s)


def follow(client: JobSubmissionClient, job_id: str, out: TextIO | None = None) -> JobStatus:
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


def report(client: JobSubmissionClient, job_id: str, status: JobStatus) -> int:
    """Write the final status (and the failure message); 0 for SUCCEEDED, 1 otherwise."""
    line = f"job {job_id} {status.value}"
    if status.value != "SUCCEEDED":
        message = (client.get_job_info(job_id).message or "").strip()
        if message:
            line += f": {message.splitlines()[-1]}"
    sys.stdout.write(line + "\n")
    return 0 if status.value == "SUCCEEDED" else 1


# --- `vitune jobs` ------------------------------------------------------------------------------------


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


def list_jobs(client: JobSubmissionClient, out: TextIO) -> None:
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
    except ClusterError as exc:
        log.error("%s", exc)
        return 2
    except RuntimeError as exc:  # the SDK's errors: unknown job id, HTTP failures
        log.error("%s", exc)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0

