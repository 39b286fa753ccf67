"""LLaVA's question / answers files: request ids, matching answers to questions, the suite registry."""

from __future__ import annotations

import pytest

from vitune import storage
from vitune.evaluation import llava_format, suite


def test_repeated_question_ids_get_their_own_request_ids():
    questions = [{"question_id": q} for q in ("a/1.png", "a/1.png", 7, "a/1.png")]
    assert llava_format.request_ids(questions) == ["a/1.png", "a/1.png#1", "7", "a/1.png#2"]


def test_answers_match_on_id_and_prompt_then_on_order():
    questions = [{"question_id": 1, "text": "q1"}, {"question_id": 1, "text": "q2"}, {"question_id": 2, "text": "q3"},
                 {"question_id": 3, "text": "q4"}]
    answers = [{"question_id": 1, "prompt": "q2", "text": "second"},
               {"question_id": 1, "prompt": "q1", "text": "first"},
               {"question_id": 2, "text": "no prompt"}]
    assert llava_format.match_answers(questions, answers) == ["first", "second", "no prompt", None]
    # without prompts, answers of one id go to its questions in file order
    plain = [{"question_id": 1, "text": "x"}, {"question_id": 1, "text": "y"}]
    assert llava_format.match_answers(questions[:2], plain) == ["x", "y"]


def test_questions_and_answers_files_are_checked(tmp_path):
    storage.write_jsonl(str(tmp_path / "q.jsonl"), [{"question_id": 1, "image": "a.jpg"}])
    with pytest.raises(ValueError, match="row 1: missing text"):
        llava_format.read_questions(str(tmp_path / "q.jsonl"))
    storage.write_jsonl(str(tmp_path / "a.jsonl"), [{"question_id": 1}])
    with pytest.raises(ValueError, match="question_id and text"):
        llava_format.read_answers(str(tmp_path / "a.jsonl"))


def test_resolve_names_under_the_root_and_keeps_uris():
    assert llava_format.resolve("s3://b/eval", None, "x.jsonl") == "s3://b/eval/x.jsonl"
    assert llava_format.resolve("s3://b/eval", "y.jsonl", "x.jsonl") == "s3://b/eval/y.jsonl"
    assert llava_format.resolve("/data", "s3://c/z.jsonl", "x.jsonl") == "s3://c/z.jsonl"


def test_every_suite_benchmark_is_registered():
    assert set(suite.BENCHMARKS) == {"pope", "mme", "textvqa", "gqa", "mmbench", "vqav2"}
    with pytest.raises(ValueError, match="valid: pope, mme"):
        suite.get("vizwiz")
