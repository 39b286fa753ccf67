"""`vitune submit` / `vitune jobs` (the installed command, run from outside the repository) against a real
two-node Ray cluster on this machine, with token auth.

The cluster is two `ray start --block` processes (head + a second node), each with its own ports, temp dir
and custom resource, and a token of its own; it writes its address only under its temp dir, so a bare
`ray.init()` elsewhere in the session never finds it, and it is torn down by the ids of the processes it
started (never `ray stop`, which would kill every Ray on the machine). The tiny pipeline (features → align)
goes through the Job Submission API; its two training workers need 2 CPUs each and each node has 3, and the
state API must show them on different nodes.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests import services
from vitune.cli import cluster as cluster_cli
from vitune.cli import submit
from vitune.data import synthetic

pytestmark = pytest.mark.integration

TINY = "tiny"
BIN = Path(sys.executable).parent
NODE_CPUS = 3  # two workers of 2 CPUs cannot share a node; 1 CPU per node is left for Ray Data and the tower
CLEAN_ENV = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE",
             *submit.FORWARD_ENV, *submit.CREDENTIAL_ENV)
# the submitting shell holds AWS credentials; a job gets them only when asked (--forward-aws-credentials)
SHELL_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "AKIATWONODE", "AWS_SECRET_ACCESS_KEY": "two-node-secret"}


class TwoNodeCluster:
    """Head + second node on loopback; explicit ports so nothing collides with other Ray instances here."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.token_path = base / "token"
        self.token_path.write_text(os.urandom(32).hex())
        self.gcs_port, self.dashboard_port = services.free_port(), services.free_port()
        self.url = f"http://127.0.0.1:{self.dashboard_port}"
        self.procs: list[subprocess.Popen] = []
        self.env = {k: v for k, v in os.environ.items() if k not in CLEAN_ENV}
        self.env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(self.token_path),
                        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # the job's `python` is this venv's
                        RAY_USAGE_STATS_ENABLED="0")

    def _ray_start(self, name: str, args: list[str]) -> None:
        temp = self.base / name
        temp.mkdir()
        cmd = [str(BIN / "ray"), "start", "--block", "--node-ip-address", "127.0.0.1",
               "--num-cpus", str(NODE_CPUS), "--resources", json.dumps({name: 1}), "--temp-dir", str(temp),
               # every port a second raylet on this host would otherwise share (or take from a fixed default)
               "--dashboard-agent-listen-port", str(services.free_port()),
               "--min-worker-port", "0", "--max-worker-port", "0",
               "--object-store-memory", str(200 * 1024 * 1024), "--disable-usage-stats", *args]
        log = open(self.base / f"{name}.log", "wb")  # noqa: SIM115 - lives as long as the process
        self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.base,
                                           start_new_session=True))

    def start(self) -> None:
        self._ray_start("head", ["--head", "--port", str(self.gcs_port), "--dashboard-port", str(self.dashboard_port),
                                 "--dashboard-host", "127.0.0.1", "--include-dashboard", "true",
                                 "--ray-client-server-port", str(services.free_port())])
        self._wait(lambda: self.get("/api/version") is not None, "the head's dashboard")
        self._ray_start("node2", ["--address", f"127.0.0.1:{self.gcs_port}"])
        self._wait(lambda: len(self.nodes()) == 2, "two alive nodes")

    def _wait(self, ready, what: str, timeout: float = 180.0) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            dead = [p.args[p.args.index("--temp-dir") + 1] for p in self.procs if p.poll() is not None]
            if dead:
                raise RuntimeError(f"ray start exited early ({dead}); see {self.base}/*.log")
            try:
                if ready():
                    return
            except (OSError, KeyError, ValueError):
                pass
            time.sleep(1)
        raise TimeoutError(f"no {what} after {timeout}s; see {self.base}/*.log")

    def get(self, path: str) -> dict | None:
        req = urllib.request.Request(self.url + path, headers={"Authorization": f"Bearer {self.token()}"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read() or b"null")

    def token(self) -> str:
        return self.token_path.read_text().strip()

    def state(self, resource: str, **filters: str) -> list[dict]:
        """Ray's state API (what ray.util.state.list_* call), with the token this cluster wants."""
        params = [("limit", "1000"), ("detail", "1")]
        for key, value in filters.items():
            params += [("filter_keys", key), ("filter_predicates", "="), ("filter_values", value)]
        return self.get(f"/api/v0/{resource}?{urllib.parse.urlencode(params)}")["data"]["result"]["result"]

    def nodes(self) -> list[dict]:
        return self.state("nodes", state="ALIVE")

    def stop(self) -> None:
        import psutil

        started = []
        for p in self.procs:
            try:
                proc = psutil.Process(p.pid)
                started += [proc, *proc.children(recursive=True)]  # raylet, GCS, agents, workers
            except psutil.NoSuchProcess:
                pass
        for p in reversed(self.procs):  # second node first; `ray start --block` shuts its node down on SIGTERM
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(self.procs):
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        _, alive = psutil.wait_procs(started, timeout=10)
        for proc in alive:  # only what these two commands started, by pid
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass


@pytest.fixture(scope="module")
def cluster():
    base = Path(tempfile.mkdtemp(prefix="vt2n-", dir="/tmp"))  # short: Ray's unix sockets live under it
    c = TwoNodeCluster(base)
    try:
        c.start()
    except BaseException:
        c.stop()  # the logs stay under base for the error message's pointer
        raise
    yield c
    c.stop()
    shutil.rmtree(base, ignore_errors=True)


def vitune(cluster: TwoNodeCluster, *argv: str, token_path: Path | None | bool = True, timeout: float = 600,
           home: Path | None = None, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The CLI as a user runs it: its own process, outside the repository (the installed checkout is found),
    the token from RAY_AUTH_TOKEN_PATH, no RAY_AUTH_MODE."""
    env = {k: v for k, v in cluster.env.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")}
    if token_path:
        env["RAY_AUTH_TOKEN_PATH"] = str(cluster.token_path if token_path is True else token_path)
    if home is not None:
        env["HOME"] = str(home)
    env.update(extra_env or {})
    return subprocess.run([str(BIN / "vitune"), *argv], cwd=cluster.base, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def trained(cluster):
    store = cluster.base / "store"
    synthetic.generate(str(store / "data"), seed=3, num_images=16, num_eval_images=0, image_size=32)
    t0 = time.perf_counter()
    run = vitune(cluster, "submit", "pipeline", "--config", TINY, "steps=features,align",
                 f"storage.root={store}", "features.num_actors=1", "tracking.enabled=false",
                 "train.num_workers=2", "train.cpus_per_worker=2", "train.epochs=1",
                 "train.global_batch_size=8", "train.micro_batch_size=4",
                 "--env", "VITUNE_TWO_NODE=1", "--address", cluster.url, extra_env=SHELL_CREDENTIALS)
    logging.getLogger(__name__).info("pipeline job: %.0fs", time.perf_counter() - t0)
    assert run.returncode == 0, f"submit failed:\n{run.stdout[-5000:]}\n{run.stderr[-5000:]}"
    job_id = run.stdout.splitlines()[0].strip()
    assert re.fullmatch(r"raysubmit_\w+", job_id), run.stdout[:500]
    return {"job_id": job_id, "store": store, "run": run}


def test_pipeline_job_succeeds_and_reports_it(trained):
    assert trained["run"].stdout.rstrip().endswith(f"job {trained['job_id']} SUCCEEDED")
    assert (trained["store"] / "train" / "align" / "model").is_dir()
    assert len(list((trained["store"] / "features").glob("*/manifest.json"))) == 1  # features/<fingerprint id>


def test_training_workers_ran_on_both_nodes(cluster, trained):
    client = cluster_cli.connect(cluster.url, {"RAY_AUTH_TOKEN_PATH": str(cluster.token_path)})
    info = client.get_job_info(trained["job_id"])
    assert info.runtime_env["env_vars"]["VITUNE_TWO_NODE"] == "1"
    # the shell's credentials stayed in the shell: the job's info (what the dashboard shows) holds none
    assert not set(SHELL_CREDENTIALS) & set(info.runtime_env["env_vars"])
    assert "two-node-secret" not in json.dumps(info.runtime_env)
    workers = cluster.state("actors", class_name="RayTrainWorker", job_id=info.job_id)
    assert len(workers) == 2, [(w["class_name"], w["state"]) for w in workers]
    nodes = {n["node_id"]: n for n in cluster.state("nodes")}
    placed = {next(k for k in ("head", "node2") if k in nodes[w["node_id"]]["resources_total"]) for w in workers}
    assert placed == {"head", "node2"}, f"both training workers on {placed}"


def test_jobs_logs_and_list_show_the_job(cluster, trained):
    logs = vitune(cluster, "jobs", "logs", trained["job_id"], "--address", cluster.url)
    assert logs.returncode == 0, logs.stderr
    summary = [json.loads(line) for line in logs.stdout.splitlines() if line.startswith('{"steps"')]
    assert [s["step"] for s in summary[-1]["steps"]] == ["features", "align"]
    listed = vitune(cluster, "jobs", "list", "--address", cluster.url)
    assert listed.returncode == 0, listed.stderr
    row = [line for line in listed.stdout.splitlines() if line.startswith(trained["job_id"])]
    assert row and "SUCCEEDED" in row[0] and "jobs/pipeline.py" in row[0]
    assert vitune(cluster, "jobs", "status", trained["job_id"], "--address", cluster.url).stdout.strip() == "SUCCEEDED"


def test_failed_job_gives_nonzero_exit(cluster, trained):
    sub = vitune(cluster, "submit", "train", "--config", TINY, "stage=align", f"storage.root={trained['store']}",
                 f"data.features={cluster.base / 'no-such-store'}", "tracking.enabled=false", "--no-wait",
                 "--address", cluster.url)
    assert sub.returncode == 0, sub.stderr
    job_id = sub.stdout.strip()
    followed = vitune(cluster, "jobs", "logs", job_id, "--follow", "--address", cluster.url)
    assert followed.returncode == 1, followed.stdout[-3000:]
    assert f"job {job_id} FAILED" in followed.stdout


def test_the_cluster_wants_its_token(cluster, tmp_path):
    refused = vitune(cluster, "jobs", "list", "--address", cluster.url, token_path=None, home=tmp_path)
    assert refused.returncode == 2
    assert "requires token auth and no token found" in refused.stderr
    wrong = tmp_path / "wrong-token"
    wrong.write_text("0" * 64)
    wrong_token = vitune(cluster, "jobs", "list", "--address", cluster.url, token_path=wrong, home=tmp_path)
    assert wrong_token.returncode == 2
    assert "the token sent was refused" in wrong_token.stderr
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(cluster.url + "/api/jobs/", timeout=10)
    assert err.value.code == 401


def test_cluster_address_stays_in_its_temp_dir(cluster):
    # a bare ray.init() reads the default temp dir's ray_current_cluster: this cluster must not be found there
    assert f":{cluster.gcs_port}" in (cluster.base / "head" / "ray_current_cluster").read_text()
    default = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
    assert not default.exists() or f":{cluster.gcs_port}" not in default.read_text()
