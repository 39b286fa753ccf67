"""``vitune models``: the registered models and their versions, with their evaluation scores and lineage.

Reads the MLflow registry of ``--tracking-uri`` (else ``MLFLOW_TRACKING_URI``, else the preset's: the SQLite
store under its storage root). A version's scores are the ``vitune.eval.<benchmark>.<metric>`` tags its
evaluations put on it (``vitune.lineage``); its data digest and feature fingerprint come from its training.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

from vitune.config import JobConfig, load_config
from vitune.family import FAMILY_TAG
from vitune.tracking import resolve_tracking_uri

EXAMPLE = """examples:
  vitune models                                   # the tiny preset's store (./runs/tiny/mlflow.db)
  vitune models vitune-tiny --tracking-uri http://mlflow:5000"""
SCORE_PREFIX = "vitune.eval."


def list_versions(tracking_uri: str, name: str | None = None) -> list[dict[str, Any]]:
    """One dict per version (newest first within a model): name, version, run, created, scores, lineage."""
    from mlflow.tracking import MlflowClient  # deferred: mlflow is slow to import; `--help` should not wait

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    names = [name] if name else sorted(m.name for m in client.search_registered_models())
    rows = []
    for model in names:
        versions = sorted(client.search_model_versions(f"name='{model}'"), key=lambda v: -int(v.version))
        for v in versions:
            tags = dict(v.tags)
            scores = {k[len(SCORE_PREFIX):]: tags[k] for k in sorted(tags)
                      if k.startswith(SCORE_PREFIX) and not k.endswith(".run")}
            rows.append({"name": model, "version": str(v.version), "run_id": v.run_id,
                         "created": v.creation_timestamp, "scores": scores,
                         "data_digest": tags.get("vitune.data.digest"),
                         "features": tags.get("vitune.features.fingerprint"), "family": tags.get(FAMILY_TAG)})
    return rows


def render(rows: list[dict[str, Any]], tracking_uri: str) -> str:
    if not rows:
        return f"no registered models at {tracking_uri}\n"
    lines, current = [f"registered models at {tracking_uri}"], None
    for r in rows:
        if r["name"] != current:
            current = r["name"]
            lines.append(f"{current}")
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["created"] / 1000)) if r["created"] else "?"
        scores = "  ".join(f"{k}={v}" for k, v in r["scores"].items()) or "not evaluated"
        lines.append(f"  models:/{r['name']}/{r['version']}  {when}  run {r['run_id']}")
        if r.get("family"):
            lines.append(f"      family    {r['family']}")
        lines.append(f"      scores    {scores}")
        if r["data_digest"] or r["features"]:
            lines.append(f"      lineage   data {r['data_digest'] or '?'}, features {r['features'] or '?'}")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="vitune models", description=__doc__.splitlines()[0], epilog=EXAMPLE,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", nargs="?", default=None, help="one registered model (default: all)")
    p.add_argument("--tracking-uri", default=None, help="the MLflow tracking URI (else MLFLOW_TRACKING_URI, "
                   "else the preset's store)")
    p.add_argument("--config", default="tiny", help="the preset whose store to read without --tracking-uri")
    p.add_argument("overrides", nargs="*", help="key.sub=value for the preset (e.g. storage.root=...)")
    args = p.parse_args(argv)
    uri = args.tracking_uri
    if not uri:
        cfg = load_config(JobConfig, args.config, args.overrides)
        uri = resolve_tracking_uri(cfg.tracking, cfg.storage.root)
    if uri.startswith("sqlite:///") and not os.path.exists(uri[len("sqlite:///"):]):
        sys.stdout.write(f"no MLflow store at {uri} (run a job first, or give --tracking-uri)\n")
        return 1
    sys.stdout.write(render(list_versions(uri, args.name), uri))
    return 0
