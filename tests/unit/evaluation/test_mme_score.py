"""MME: ground-truth lookup in the release's files, the answer rule, acc / acc+ / scores on hand-made answers."""

from __future__ import annotations

import pytest

from vitune import storage
from vitune.config import EvalJobConfig
from vitune.evaluation import llava_format, mme

SHORT = llava_format.SHORT_ANSWER_PROMPT
YN = " Please answer yes or no."

# (question id, question, ground truth line as the release writes it)
QUESTIONS = [
    ("existence/000.jpg", "Is there a dog in this image?", f"Is there a dog in this image?{YN}\tYes"),
    ("existence/000.jpg", "Is there a cat in this image?", f"Is there a cat in this image?{YN}\tNo"),
    ("existence/001.jpg", "Is there a bus in this image?", f"Is there a bus in this image?{YN}\tYes"),
    ("existence/001.jpg", "Is there a car in this image?", f"Is there a car in this image?{YN}\tNo"),
    # a subtask with images/ and questions_answers_YN/, and a ground truth with two spaces before "Please"
    ("artwork/images/10.jpg", "Is this artwork by Monet?", f"Is this artwork by Monet? {YN}\tYes"),
    ("artwork/images/10.jpg", "Is this artwork by Goya?", f"Is this artwork by Goya?{YN}\tNo"),
    ("code_reasoning/0001.png", "Is the output '1'?", f"Is the output '1'?{YN}\tYes"),
    ("code_reasoning/0001.png", "Is the output '2'?", f"Is the output '2'?{YN}\tYes"),
]


def _mme_folder(tmp_path):
    release = tmp_path / mme.RELEASE_DIR
    files: dict[str, list[str]] = {}
    for qid, _, line in QUESTIONS:
        files.setdefault(mme.truth_file(qid), []).append(line)
    for name, lines in files.items():
        storage.write_text(str(release / name), "\n".join(lines) + "\n")
    rows = [{"question_id": qid, "image": qid, "text": f"{q}\n{SHORT}", "category": qid.split("/")[0]}
            for qid, q, _ in QUESTIONS]
    storage.write_jsonl(str(tmp_path / mme.QUESTIONS_FILE), rows)
    return str(release)


# answers as LLaVA writes them, deliberately out of file order (matched on question id + prompt)
ANSWERS = [
    ("existence/000.jpg", "Is there a cat in this image?", "No"),
    ("existence/000.jpg", "Is there a dog in this image?", "Yes"),
    ("existence/001.jpg", "Is there a bus in this image?", "yes, there is"),  # "yes" in the first 4 characters
    ("existence/001.jpg", "Is there a car in this image?", "I think yes"),  # "i th": other → wrong
    ("artwork/images/10.jpg", "Is this artwork by Monet?", "yes"),
    ("artwork/images/10.jpg", "Is this artwork by Goya?", "No."),  # "no." has "no" in its first 4
    ("code_reasoning/0001.png", "Is the output '1'?", "Yes"),
    # the second code_reasoning question has no answer
]


def test_truth_files_and_questions():
    assert mme.truth_file("existence/000.jpg") == "existence/000.txt"
    assert mme.truth_file("artwork/images/14777.jpg") == "artwork/questions_answers_YN/14777.txt"
    assert mme.truth_question(f"Is it red?\n{SHORT}") == f"Is it red?{YN}"
    assert mme.truth_question(f"Is it red?{YN}") == f"Is it red?{YN}"


@pytest.mark.parametrize("text, expected", [("Yes", "yes"), ("no", "no"), ("NO", "no"), ("Yes, it is", "yes"),
                                             ("Nope", "no"), ("There is", "other"), ("", "other"),
                                             ("I'm not sure", "other"), (" yes", "yes"), ("noyes", "no")])
def test_answer_rule(text, expected):
    assert mme.parse_answer(text) == expected


def test_scores_a_hand_made_answers_file(tmp_path):
    release = _mme_folder(tmp_path)
    answers_uri = str(tmp_path / "answers.jsonl")
    rows = [{"question_id": qid, "prompt": f"{q}\n{SHORT}", "text": t} for qid, q, t in ANSWERS]
    storage.write_jsonl(answers_uri, rows)
    questions = mme.attach_truth(llava_format.read_questions(str(tmp_path / mme.QUESTIONS_FILE)), release)
    assert [q["label"] for q in questions] == ["yes", "no", "yes", "no", "yes", "no", "yes", "yes"]
    result, rows = mme.score(questions, llava_format.read_answers(answers_uri))

    # existence: 3 of 4 questions right → acc 75; image 000 both right, 001 not → acc+ 1/2 = 50; score 125
    assert result["subtasks"]["existence"] == {"n": 4, "images": 2, "acc": 75.0, "acc_plus": 50.0, "score": 125.0,
                                               "other": 1}
    # artwork: 2 of 2, 1 of 1 image → 100 + 100 = 200
    assert result["subtasks"]["artwork"]["score"] == 200.0
    # code_reasoning: 1 of 2 (the unanswered one is "other") → acc 50, acc+ 0 → 50
    assert result["subtasks"]["code_reasoning"]["score"] == 50.0
    # perception 125 + 200 = 325, cognition 50
    assert (result["perception"], result["cognition"]) == (325.0, 50.0)
    assert result["missing"] == 1
    assert "position" in result["absent_subtasks"]
    assert [r["parsed"] for r in rows][:4] == ["yes", "no", "yes", "other"]
    assert mme.metrics(result)["existence.acc_plus"] == 50.0
    assert "**325.00**" in mme.markdown(result)


def test_a_question_missing_from_the_release_is_an_error(tmp_path):
    release = _mme_folder(tmp_path)
    questions = [{"question_id": "existence/000.jpg", "image": "x.jpg", "text": f"Is there a cow?\n{SHORT}"}]
    with pytest.raises(ValueError, match="Is there a cow"):
        mme.attach_truth(questions, release)


def test_run_mme_gives_repeated_question_ids_their_own_requests(tmp_path):
    _mme_folder(tmp_path)
    by_prompt = {f"<image>\n{q}\n{SHORT}": t for _, q, t in ANSWERS}

    def answer(requests):
        return {r["id"]: by_prompt[r["conversations"][0]["value"]] for r in requests
                if r["conversations"][0]["value"] in by_prompt}, None

    cfg = EvalJobConfig.model_validate({"eval": {"data": str(tmp_path)}})
    report = mme.run_mme(cfg, str(tmp_path / "out"), answer)
    assert (report["result"]["perception"], report["result"]["cognition"]) == (325.0, 50.0)
    written = storage.read_jsonl(str(tmp_path / "out" / llava_format.ANSWERS_FILE))
    assert [a["answer_id"] for a in written[:2]] == ["existence/000.jpg", "existence/000.jpg#1"]
