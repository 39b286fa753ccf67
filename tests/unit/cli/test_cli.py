"""The `vitune` command from any directory: the repository is found one way (and only where a command acts on a
checkout), the library never imports `serving/` or `jobs/`, and `vitune submit` resolves jobs, presets and YAML
paths, the token and the runtime env before anything reaches a cluster (no Ray is started here)."""

from __future__ import annotations

import ast
import logging
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from vitune.cli import cluster as cluster_cli
from vitune.cli import repo, submit
from vitune.config import ConfigError, ServeConfig, resolve_preset

ROOT = Path(__file__).resolve().parents[3]
PACKAGE = ROOT / "platform" / "vitune"
VITUNE = Path(sys.executable).parent / "vitune"  # the installed console script, as a user runs it
REPO_MODULES = {"serving", "jobs", "_common"}


def _outside_env() -> dict[str, str]:
    """This environment without anything that would put the repository on the import path."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}


def test_the_library_never_imports_the_repository():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""] if node.level == 0 else []
            elif isinstance(node, ast.Attribute) and node.attr == "path" and getattr(node.value, "id", "") == "sys":
                names = ["sys.path"]
            else:
                continue
            offenders += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names
                          if n.split(".")[0] in REPO_MODULES or n == "sys.path"]
    assert not offenders, offenders


def test_the_serve_face_is_the_packaged_application():
    import serving.app
    from vitune.serve import app

    assert serving.app.build_app is app.build_app and serving.app.make_app is app.make_app
    assert app.VLMEngine.func_or_class.__module__ == "vitune.serve.app"


def test_the_demo_serves_what_the_deploy_config_serves():
    """serving/config.yaml's args beyond the model and its name are ServeConfig's defaults: the demo's serve."""
    raw = yaml.safe_load((ROOT / "serving" / "config.yaml").read_text())
    (application,) = raw["applications"]
    args = application["args"]
    shipped = ServeConfig.model_validate(args)
    defaults = ServeConfig(model=args["model"], served_model_name=args["served_model_name"])
    assert shipped == defaults, "serving/config.yaml sets args the demo would not serve with"
    assert application["name"] == "vitune" and application["route_prefix"] == "/"


def test_repo_root_is_found_upwards_then_from_the_installed_checkout(tmp_path):
    assert repo.is_repo_root(ROOT) and repo.installed_checkout() == ROOT
    assert repo.find_repo_root(PACKAGE / "cli") == ROOT
    other = tmp_path / "other-checkout"
    (other / "jobs").mkdir(parents=True)
    (other / "pyproject.toml").write_text("")
    (other / "deep" / "er").mkdir(parents=True)
    assert repo.find_repo_root(other / "deep" / "er") == other.resolve()
    assert repo.find_repo_root(tmp_path) == ROOT  # nowhere above: the checkout vitune is installed from


def test_preset_names_go_as_they_are_and_yaml_paths_relative_to_the_repository(tmp_path):
    assert submit.resolve_config("tiny", ROOT) == submit.ConfigRef("tiny", "tiny")
    preset = Path(resolve_preset("tiny"))
    assert submit.resolve_config(str(preset), ROOT).remote == "platform/vitune/presets/tiny.yaml"
    assert submit.resolve_config("platform/vitune/presets/tiny.yaml", ROOT).local.endswith("tiny.yaml")
    assert submit.resolve_config("s3://b/c.yaml", ROOT).remote == "s3://b/c.yaml"
    with pytest.raises(ConfigError, match="unknown preset 'tinny'.*tiny"):
        submit.resolve_config("tinny", ROOT)
    outside = tmp_path / "c.yaml"
    outside.write_text("{}")
    with pytest.raises(submit.SubmitError, match="outside the working dir"):
        submit.resolve_config(str(outside), ROOT)
    with pytest.raises(submit.SubmitError, match="not found"):
        submit.resolve_config("no/such.yaml", ROOT)


def test_jobs_resolve_inside_the_repository(tmp_path):
    assert submit.resolve_job("train", ROOT) == ("jobs/train.py", "train")
    assert submit.resolve_job(str(ROOT / "jobs" / "evaluate.py"), ROOT) == ("jobs/evaluate.py", "evaluate")
    with pytest.raises(submit.SubmitError, match="unknown job"):
        submit.resolve_job("trian", ROOT)
    with pytest.raises(submit.SubmitError, match="jobs/train.py not found in the working dir"):
        submit.resolve_job("train", tmp_path)


def test_bad_override_fails_before_anything_is_sent(caplog):
    # no cluster at this address: validation must fail first, naming the field
    with caplog.at_level(logging.ERROR, logger="vitune.cli.submit"):
        rc = submit.main_submit(["train", "--config", "tiny", "train.num_workers=0", "--address", "http://127.0.0.1:9"])
    assert rc == 2
    assert "train.num_workers" in caplog.text


def test_job_env_runtime_env_and_entrypoint():
    env = submit.job_env({"AWS_ENDPOINT_URL": "http://s3", "MLFLOW_TRACKING_URI": "", "HOME": "/root"},
                         submit.parse_env(["A=1", "AWS_ENDPOINT_URL=http://other"]))
    assert env == {"AWS_ENDPOINT_URL": "http://other", "A": "1"}  # set ones forwarded, --env wins, empty skipped
    with pytest.raises(submit.SubmitError, match="KEY=VALUE"):
        submit.parse_env(["novalue"])
    renv = submit.build_runtime_env(ROOT, env, ["rich"])
    assert renv["working_dir"] == str(ROOT) and renv["py_modules"] == [str(PACKAGE)]
    assert {".venv", "runs", ".git"} <= set(renv["excludes"]) and renv["pip"] == ["rich"]
    entry = submit.build_entrypoint("jobs/train.py", "tiny", ["data.records=[a, b]", "stage=align"])
    assert entry == "python jobs/train.py --config tiny 'data.records=[a, b]' stage=align"


SHELL = {"AWS_ENDPOINT_URL": "http://s3", "AWS_DEFAULT_REGION": "eu-west-1", "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE",
         "AWS_SECRET_ACCESS_KEY": "s3cr3t", "AWS_SESSION_TOKEN": "tok", "MLFLOW_TRACKING_URI": "http://mlflow:5000"}


def test_aws_credentials_stay_here_unless_asked(caplog):
    with caplog.at_level(logging.INFO, logger="vitune.cli.submit"):
        env = submit.job_env(SHELL, {})
    assert env == {"AWS_ENDPOINT_URL": "http://s3", "AWS_DEFAULT_REGION": "eu-west-1",
                   "MLFLOW_TRACKING_URI": "http://mlflow:5000"}
    assert "--forward-aws-credentials" in caplog.text and "s3cr3t" not in caplog.text
    assert submit.job_env(SHELL, {}, forward_credentials=True) == SHELL  # the flag sends all three
    # an explicit --env pair is also asked for
    assert submit.job_env(SHELL, {"AWS_SECRET_ACCESS_KEY": "x"})["AWS_SECRET_ACCESS_KEY"] == "x"
    parsed = submit.submit_parser().parse_intermixed_args(["train", "--config", "tiny", "--forward-aws-credentials"])
    assert parsed.forward_aws_credentials is True
    assert submit.submit_parser().parse_intermixed_args(["train", "--config", "tiny"]).forward_aws_credentials is False


def test_the_upload_leaves_out_dotenv_files_and_keys(tmp_path):
    from ray._private.runtime_env.packaging import create_package  # what Ray zips for working_dir / py_modules

    files = ["jobs/train.py", "README.md", ".env", ".env.local", "sub/.env", "server.pem", "deep/er/tls.key",
             "keys.py", "environment.yaml"]
    for name in files:
        (tmp_path / "repo" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "repo" / name).write_text("x")
    zipped = tmp_path / "pkg.zip"
    create_package(str(tmp_path / "repo"), zipped, include_gitignore=False, excludes=submit.EXCLUDES)
    sent = {n for n in zipfile.ZipFile(zipped).namelist() if not n.endswith("/")}
    assert sent == {"jobs/train.py", "README.md", "keys.py", "environment.yaml"}


def test_token_is_found_the_way_ray_finds_it(tmp_path):
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("from-home\n")
    path = tmp_path / "tok"
    path.write_text("from-path\n")
    assert cluster_cli.auth_token({"HOME": str(home)}) == "from-home"
    assert cluster_cli.auth_token({"HOME": str(home), "RAY_AUTH_TOKEN_PATH": str(path)}) == "from-path"
    env = {"HOME": str(home), "RAY_AUTH_TOKEN_PATH": str(path), "RAY_AUTH_TOKEN": "env"}
    assert cluster_cli.auth_token(env) == "env"
    assert cluster_cli.auth_token({"HOME": str(tmp_path)}) is None
    with pytest.raises(cluster_cli.ClusterError, match="cannot be read"):
        cluster_cli.auth_token({"HOME": str(home), "RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")})
    assert cluster_cli.dashboard_url("h:8265", {}) == "http://h:8265"
    assert cluster_cli.dashboard_url(None, {"RAY_ADDRESS": "http://x:1"}) == "http://x:1"
    with pytest.raises(cluster_cli.ClusterError, match="no cluster"):
        cluster_cli.dashboard_url(None, {})


def test_help_imports_no_subcommand():
    probe = ("import sys\nfrom vitune.cli import main\ntry:\n    main.main(['--help'])\nexcept SystemExit:\n    pass\n"
             "print(sorted(m for m in ('ray', 'torch', 'pyarrow', 'vitune.cli.submit') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], env=_outside_env(), capture_output=True, text=True,
                         timeout=60, check=True)
    assert "submit" in out.stdout and out.stdout.strip().splitlines()[-1] == "[]", out.stdout


def test_the_installed_command_works_outside_the_repository(tmp_path):
    help_ = subprocess.run([str(VITUNE), "--help"], cwd=tmp_path, env=_outside_env(), capture_output=True,
                           text=True, timeout=60)
    assert help_.returncode == 0 and "submit" in help_.stdout, help_.stderr
    # the preset by name and the repository (the installed checkout) are found from here; the bad override is
    # refused before any cluster is contacted (nothing listens on port 9)
    sub = subprocess.run([str(VITUNE), "submit", "train", "--config", "tiny", "train.num_workers=0",
                          "--address", "http://127.0.0.1:9"], cwd=tmp_path, env=_outside_env(),
                         capture_output=True, text=True, timeout=120)
    assert sub.returncode == 2, sub.stderr
    assert "train.num_workers" in sub.stderr and "repository" not in sub.stderr, sub.stderr


@pytest.mark.parametrize("command", ["features", "train", "evaluate", "generate", "pipeline", "export", "demo",
                                     "submit", "jobs", "data", "serve", "models"])
def test_every_subcommand_has_help_with_an_example_or_usage(command, capsys):
    from vitune.cli.main import main

    with pytest.raises(SystemExit) as stop:
        main([command, "--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert f"vitune {command}" in out or f"usage: vitune {command}" in out or "usage:" in out
    if command in ("features", "train", "evaluate", "generate", "pipeline"):
        assert f"example: vitune {command} --config tiny" in out
    if command in ("serve", "models"):
        assert f"examples:\n  vitune {command}" in out


@pytest.fixture
def console_restored(monkeypatch):
    """main() sets up the console (a root handler, the Ray log file's env var): undone after the test."""
    from vitune import progress

    handlers = list(logging.getLogger().handlers)
    monkeypatch.delenv(progress.RAY_LOG_ENV, raising=False)
    monkeypatch.setenv("MLFLOW_LOGGING_LEVEL", os.environ.get("MLFLOW_LOGGING_LEVEL", "INFO"))
    yield
    for h in logging.getLogger().handlers:
        if h not in handlers:
            logging.getLogger().removeHandler(h)


def test_models_says_when_there_is_no_store(tmp_path, capsys, console_restored):
    from vitune.cli.main import main

    assert main(["models", "--config", "tiny", f"storage.root={tmp_path}"]) == 1
    assert "no MLflow store at sqlite:///" in capsys.readouterr().out
    assert not (tmp_path / "mlflow.db").exists()  # looking creates no store


def test_serve_refuses_a_bad_setting_before_starting_ray(tmp_path, console_restored):
    from vitune.cli import serve as serve_cli

    config = tmp_path / "serve.yaml"
    config.write_text("applications:\n  - args: {model: elsewhere, served_model_name: x, max_batch_size: 0}\n")
    with pytest.raises(ValidationError, match="max_batch_size"):
        serve_cli.main(["./model", "--config", str(config)])
    args = serve_cli.app_args("models:/m/2", None, "chat", "sqlite:///x.db")
    assert args == {"model": "models:/m/2", "served_model_name": "chat", "tracking_uri": "sqlite:///x.db"}


def test_a_local_job_subcommand_runs_the_job_and_refuses_a_bad_override(capsys, console_restored):
    from vitune.cli.main import main

    with pytest.raises(ConfigError, match="train.lrr"):
        main(["train", "--config", "tiny", "stage=align", "train.lrr=1"])
