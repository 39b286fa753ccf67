"""The tables of jobs and benchmarks (vitune.catalog) are the one source: every entry resolves, every site
reads the table (an entry added here is validated, dispatched and listed; one removed is refused), no
other module holds a list of benchmark names, and reading the tables loads no job's stack."""

from __future__ import annotations

import ast
import inspect
import json
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from vitune import catalog, config

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "platform" / "vitune"
HEAVY = ("torch", "transformers", "peft", "bitsandbytes", "deepspeed", "open_clip", "vitune.evaluation")


# --- every entry resolves ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(catalog.BENCHMARKS))
def test_every_benchmark_resolves_to_its_functions(name):
    bench = catalog.BENCHMARKS[name]
    run = catalog.load(bench.run)
    assert list(inspect.signature(run).parameters) == ["cfg", "out", "answer_fn", "judge"], bench.run
    for path in (bench.markdown, bench.metrics, *([bench.chart] if bench.chart else [])):
        assert callable(catalog.load(path)), path
    # the judge switch is an eval.* boolean (or always / never)
    assert bench.judge in (None, "always") or config.EvalConfig.model_fields[bench.judge].annotation in (bool, "bool")


def test_the_benchmarks_are_the_ones_documented():
    assert list(catalog.BENCHMARKS) == ["scienceqa", "llava_bench", "synthetic", "pope", "mme", "textvqa", "gqa",
                                        "mmbench", "vqav2"]
    readme = (ROOT / "README.md").read_text()
    assert all(f"| `{name}` |" in readme for name in catalog.BENCHMARKS)  # the README's benchmark table
    with pytest.raises(ValueError, match="unknown benchmark 'vizwiz'; valid benchmarks: scienceqa, llava_bench, "):
        catalog.benchmark("vizwiz")


@pytest.mark.parametrize("name", sorted(catalog.JOBS))
def test_every_job_resolves_to_its_config_run_and_summary(name):
    spec = catalog.JOBS[name]
    assert spec.config is None or issubclass(catalog.load(spec.config), config.JobConfig)
    for path in (spec.run, *([spec.summary] if spec.summary else [])):
        assert callable(catalog.load(path)), path
    assert (ROOT / "jobs" / f"{name}.py").is_file()


def test_job_commands_are_unique_and_every_pipeline_step_is_a_job():
    from vitune import pipeline

    commands = [j.command for j in catalog.JOBS.values()]
    assert len(set(commands)) == len(commands)
    assert all(step.job in catalog.JOBS for step in pipeline.PIPELINE.values())
    with pytest.raises(ValueError, match="is not of the form module:attribute"):
        catalog.load("vitune.config")


# --- benchmarks: the config and the evaluation read the table --------------------------------------------


def test_config_refuses_an_unknown_benchmark_naming_every_valid_one():
    assert config.EvalConfig().benchmark in catalog.BENCHMARKS
    with pytest.raises(config.ConfigError) as err:
        config.build_config(config.EvalJobConfig, {}, ["eval.benchmark=vizwiz"])
    msg = str(err.value)
    assert "eval.benchmark" in msg and "'vizwiz'" in msg
    assert f"valid benchmarks: {', '.join(catalog.BENCHMARKS)}" in msg


def test_a_benchmark_taken_out_of_the_table_is_refused(monkeypatch):
    monkeypatch.delitem(catalog.BENCHMARKS, "pope")
    with pytest.raises(config.ConfigError, match="unknown benchmark 'pope'"):
        config.build_config(config.EvalJobConfig, {}, ["eval.benchmark=pope"])


def run_made_up(cfg: Any, out: str, answer_fn: Any, judge: Any) -> dict[str, Any]:
    texts, inference = answer_fn([{"id": "q1", "image": None, "conversations": []}])
    return {"result": {"correct": float(texts.get("q1") == "yes"), "judged": judge is not None},
            "inference": inference}


def made_up_markdown(result: Mapping[str, Any]) -> str:
    return f"## Made-up benchmark\n\ncorrect: {result['correct']}\n"


def made_up_metrics(result: Mapping[str, Any]) -> dict[str, float]:
    return {"correct": result["correct"]}


def test_a_made_up_benchmark_is_validated_dispatched_and_reported(tmp_path, monkeypatch):
    from vitune.evaluation import report as report_lib
    from vitune.evaluation.run import run_evaluation

    here = __name__
    monkeypatch.setitem(catalog.BENCHMARKS, "made_up", catalog.Benchmark(
        f"{here}:run_made_up", f"{here}:made_up_markdown", f"{here}:made_up_metrics"))
    predictions = tmp_path / "answers.jsonl"
    predictions.write_text(json.dumps({"question_id": "q1", "text": "yes"}) + "\n")
    cfg = config.build_config(config.EvalJobConfig, {}, [
        f"storage.root={tmp_path}", "tracking.enabled=false", "eval.benchmark=made_up",
        f"eval.predictions={predictions}"])
    report = run_evaluation(cfg)
    assert report["benchmark"] == "made_up" and report["result"] == {"correct": 1.0, "judged": False}
    out = tmp_path / "eval" / "made_up" / "predictions"
    assert "## Made-up benchmark" in (out / "report.md").read_text()
    assert json.loads((out / "report.json").read_text())["result"]["correct"] == 1.0
    assert (out / report_lib.CHART_FILE).read_bytes().startswith(b"\x89PNG")  # the metrics, plotted as "score"
    assert report_lib.metrics(report) == {"correct": 1.0}


def _string_collections(tree: ast.AST) -> list[tuple[int, set[str]]]:
    """The string constants of every literal collection (tuple, list, set, dict keys, Literal[...])."""
    found = []
    for node in ast.walk(tree):
        items: list[ast.AST] = []
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            items = list(node.elts)
        elif isinstance(node, ast.Dict):
            items = [k for k in node.keys if k is not None]
        strings = {i.value for i in items if isinstance(i, ast.Constant) and isinstance(i.value, str)}
        found.append((getattr(node, "lineno", 0), strings))
    return found


def test_no_module_but_the_catalog_lists_or_compares_benchmark_names():
    names = set(catalog.BENCHMARKS)
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "catalog.py" and path.parent == PACKAGE:
            continue
        tree = ast.parse(path.read_text(), str(path))
        where = path.relative_to(ROOT)
        offenders += [f"{where}:{line} {sorted(s & names)}" for line, s in _string_collections(tree)
                      if len(s & names) >= 2]
        for node in ast.walk(tree):  # `benchmark == "scienceqa"`: a benchmark's own rule kept outside its entry
            if isinstance(node, ast.Compare) and "benchmark" in ast.unparse(node):
                consts = {c.value for c in ast.walk(node) if isinstance(c, ast.Constant)}
                offenders += [f"{where}:{node.lineno} {ast.unparse(node)}"] if consts & names else []
    assert not offenders, offenders


# --- jobs: cli/jobs, cli/main and submit read the table ------------------------------------------------


def run_made_up_job(cfg: config.JobConfig) -> dict[str, Any]:
    return {"root": cfg.storage.root, "secret": "not printed"}


def made_up_job_summary(result: dict[str, Any]) -> dict[str, Any]:
    return {"root": result["root"]}


@pytest.fixture
def made_up_job(monkeypatch):
    here = __name__
    monkeypatch.setitem(catalog.JOBS, "made_up", catalog.Job(
        "made-up", "a job made up by the test", "vitune.config:JobConfig", f"{here}:run_made_up_job",
        f"{here}:made_up_job_summary"))


def test_a_made_up_job_runs_is_a_subcommand_and_is_submitted(made_up_job, tmp_path, capsys):
    from vitune.cli import jobs, submit
    from vitune.cli.main import build_parser

    assert jobs.main("made_up", ["--config", "tiny", f"storage.root={tmp_path}"]) == 0
    assert json.loads(capsys.readouterr().out) == {"root": str(tmp_path)}
    assert "a job made up by the test" in build_parser().format_help()
    args, rest = build_parser().parse_known_args(["made-up", "--config", "tiny", f"storage.root={tmp_path}/x"])
    assert args.func(args, rest) == 0  # `vitune made-up ...` runs the job
    assert json.loads(capsys.readouterr().out) == {"root": f"{tmp_path}/x"}
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "made_up.py").write_text("")
    assert submit.resolve_job("made_up", tmp_path) == ("jobs/made_up.py", "made_up")
    (cfg,) = submit.validate_job("made_up", "tiny", [f"storage.root={tmp_path}"])
    assert type(cfg) is config.JobConfig
    with pytest.raises(config.ConfigError, match="storage.nope"):
        submit.validate_job("made_up", "tiny", ["storage.nope=1"])
    assert "made_up" in submit.submit_parser().format_help()


def test_reading_the_tables_loads_no_job_stack():
    """`vitune submit --help` and validating every job's config import no torch, no DeepSpeed, no eval code."""
    probe = ("import sys\nfrom vitune.cli import submit\nsubmit.submit_parser().format_help()\n"
             "for job in ('extract_features', 'train', 'evaluate', 'generate_instructions', 'pipeline'):\n"
             "    submit.validate_job(job, 'tiny', ['eval.benchmark=pope'] if job == 'evaluate' else [])\n"
             f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r} or m.startswith({HEAVY!r})))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout + out.stderr
