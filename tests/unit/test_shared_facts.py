"""One definition of each shared fact, and every job entrypoint in the one shape."""

from __future__ import annotations

import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_shared_facts_are_defined_once():
    import vitune
    from vitune.data import masks, records
    from vitune.model import vlm

    assert (vitune.IGNORE_INDEX, vitune.HUMAN, vitune.GPT) == (-100, "human", "gpt")
    assert masks.IGNORE_INDEX is vlm.IGNORE_INDEX is vitune.IGNORE_INDEX  # imported, not restated
    assert records.ROLES == (vitune.HUMAN, vitune.GPT)


def test_every_job_entrypoint_has_the_one_shape():
    from vitune.catalog import JOBS

    files = sorted(p[:-3] for p in os.listdir(os.path.join(ROOT, "jobs")) if p.endswith(".py"))
    assert files == sorted(JOBS)  # one entrypoint per job, no helper module beside them
    for job in files:
        text = open(os.path.join(ROOT, "jobs", f"{job}.py")).read()
        assert f'return jobs.main("{job}", argv, __doc__)' in text and len(text.splitlines()) < 40, job
        assert "sys.path" not in text and "argparse" not in text, job


def test_job_without_config_is_refused(capsys):
    from vitune.cli.jobs import main

    with pytest.raises(SystemExit) as err:
        main("train", [])
    assert err.value.code == 2 and "--config" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown job 'nope'; valid jobs: extract_features, train"):
        main("nope", ["--config", "tiny"])
