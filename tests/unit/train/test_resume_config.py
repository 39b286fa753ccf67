"""Resume refuses a checkpoint written by another config: the digest every checkpoint records is compared
before a restarted worker loads it (only how a run is run may differ: failures, logging, checkpoint cadence)."""

from __future__ import annotations

import pytest

from vitune.config import TrainJobConfig, load_config
from vitune.train.driver import CONFIG_DIGEST_FILE, check_checkpoint_config, config_digest


def _digest(*overrides: str) -> str:
    return config_digest(load_config(TrainJobConfig, "tiny", list(overrides)).model_dump(mode="json"))


def test_digest_follows_what_a_run_computes_not_how_it_is_run():
    base = _digest()
    assert _digest("train.max_failures=5", "train.fail_at_step=3", "train.checkpoint_every=7",
                   "train.log_every=3", "tracking.enabled=false") == base
    assert _digest("train.lr=0.5") != base
    assert _digest("train.max_steps=3") != base
    assert _digest("model.projector=linear") != base


def test_checkpoint_of_another_config_is_refused(tmp_path):
    (tmp_path / CONFIG_DIGEST_FILE).write_text(_digest("train.lr=0.5"))
    with pytest.raises(ValueError, match="refusing to resume from a checkpoint written by another config"):
        check_checkpoint_config(tmp_path, _digest())
    check_checkpoint_config(tmp_path, _digest("train.lr=0.5"))  # the same config resumes
