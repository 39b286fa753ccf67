"""LLaVA's question / answers files: request ids, matching answers to questions (the benchmark table:
tests/unit/test_catalog.py)."""

from __future__ import annotations

import pytest

from vitune import storage
from vitune.evaluation import llava_format


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


def test_answers_in_chunks_are_merged_in_chunk_order(tmp_path):
    folder = tmp_path / "answers"
    for i, ids in enumerate(([1, 2], [3], [4, 5])):
        storage.write_jsonl(str(folder / f"3_{i}.jsonl"), [{"question_id": q, "text": str(q)} for q in ids])
    storage.write_text(str(folder / "notes.txt"), "not an answer file")
    rows = llava_format.read_answers(str(folder))
    assert [r["question_id"] for r in rows] == [1, 2, 3, 4, 5]
    assert rows[3].where == f"{folder}/3_2.jsonl line 1"
    (folder / "3_1.jsonl").unlink()
    with pytest.raises(ValueError, match=r"chunks missing: 3_1.jsonl"):
        llava_format.read_answers(str(folder))
    storage.write_jsonl(str(folder / "2_0.jsonl"), [])
    with pytest.raises(ValueError, match=r"one run of model_vqa_loader \(found: 2 chunks, 3 chunks\)"):
        llava_format.read_answers(str(folder))


def test_answer_file_errors_name_the_file_and_line(tmp_path):
    uri = str(tmp_path / "a.jsonl")
    questions = [{"question_id": 1, "text": "q1"}, {"question_id": 2, "text": "q2"}]
    storage.write_text(uri, '{"question_id": 1, "prompt": "q1", "text": "x"}\n\n{"question_id": 1, "prompt": "q1", '
                            '"text": "y"}\n')
    with pytest.raises(ValueError, match=rf"{uri} line 3: question '1' with this prompt is answered twice "
                                         rf"\(first at {uri} line 1\)"):
        llava_format.read_answers(uri)
    storage.write_jsonl(uri, [{"question_id": 1, "text": "x"}, {"question_id": 1, "text": "y"}])
    with pytest.raises(ValueError, match=rf"{uri} line 2: question '1' is answered again \(also at {uri} line 1\)"):
        llava_format.match_answers(questions, llava_format.read_answers(uri))
    storage.write_jsonl(uri, [{"question_id": 2, "text": "x"}, {"question_id": 7, "text": "y"}])
    with pytest.raises(ValueError, match=rf"{uri} line 2: an answer for question '7', which the question file"):
        llava_format.match_answers(questions, llava_format.read_answers(uri))
    storage.write_jsonl(uri, [{"question_id": 2, "text": "x"}, {"text": "y"}])
    with pytest.raises(ValueError, match=rf"{uri} line 2: an answer needs question_id and text"):
        llava_format.read_answers(uri)


def test_answer_texts_for_unique_ids_allow_id_and_a_limit(tmp_path):
    uri = str(tmp_path / "sqa.jsonl")
    storage.write_jsonl(uri, [{"question_id": "4", "prompt": "<image>\nq", "text": "A"}, {"id": "5", "text": "B"}])
    assert llava_format.answer_texts(uri, ["4", "5", "6"]) == {"4": "A", "5": "B"}
    with pytest.raises(ValueError, match="line 2: an answer for question '5'"):
        llava_format.answer_texts(uri, ["4"])
    assert llava_format.answer_texts(uri, ["4"], limited=True) == {"4": "A"}
