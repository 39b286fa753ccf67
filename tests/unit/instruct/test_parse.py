"""Generation without Ray: parsing each kind (good and malformed), inputs and context, prompts, planning, dedup."""

from __future__ import annotations

import json

import pytest

from vitune.data.records import validate_record
from vitune.instruct.inputs import ImageContext, parse_jsonl_image, read_coco, read_inputs, read_jsonl
from vitune.instruct.parse import ParseError, build_record, fingerprint, parse_complex, parse_conversation
from vitune.instruct.prompts import KINDS, PromptError, load_prompt, load_prompts
from vitune.instruct.run import collect, plan_tasks

CONVERSATION = """Question:
What color is the bus?
===
Answer:
The bus is red.
===
Question:
Is it raining?
===
Answer:
Yes. The street is wet and people carry umbrellas.

They are waiting at the stop."""

COMPLEX = """Question:
Why are the people holding umbrellas?
===
Answer:
It is raining, as the wet street shows, so they keep dry while they wait."""

DETAIL = "A red double-decker bus drives along a wet street while people wait at a stop with umbrellas."


def test_conversation_becomes_multi_turn_record():
    rec = build_record("conversation", "img1-conversation", "coco/1.jpg", CONVERSATION)
    turns = rec["conversations"]
    assert [t["from"] for t in turns] == ["human", "gpt", "human", "gpt"]
    assert turns[0]["value"] == "<image>\nWhat color is the bus?"
    assert turns[2]["value"] == "Is it raining?"
    assert turns[3]["value"].endswith("They are waiting at the stop.") and "\n\n" in turns[3]["value"]
    assert rec["kind"] == "conversation" and rec["image"] == "coco/1.jpg"
    validate_record(rec)


def test_labels_on_same_line_bold_and_without_separators_are_accepted():
    text = "**Question:** How many dogs?\n**Answer:** Two dogs.\nQuestion: Where?\n===\nAnswer: On the grass."
    assert parse_conversation(text) == [("How many dogs?", "Two dogs."), ("Where?", "On the grass.")]


def test_complex_becomes_one_turn_record():
    rec = build_record("complex", "img1-complex", "1.jpg", COMPLEX, extra={"prompt_hash": "abc"})
    assert [t["value"] for t in rec["conversations"]] == [
        "<image>\nWhy are the people holding umbrellas?",
        "It is raining, as the wet street shows, so they keep dry while they wait."]
    assert rec["prompt_hash"] == "abc"
    validate_record(rec)


def test_detail_uses_the_chosen_question():
    rec = build_record("detail", "img1-detail", "1.jpg", "  " + DETAIL + "\n",
                       question="Describe this image in detail.")
    assert rec["conversations"] == [{"from": "human", "value": "<image>\nDescribe this image in detail."},
                                    {"from": "gpt", "value": DETAIL}]
    validate_record(rec)


@pytest.mark.parametrize("kind, text, finish, reason", [
    ("conversation", "", None, "empty_output"),
    ("conversation", "   \n ", None, "empty_output"),
    ("conversation", "Sure! Here is a conversation.\nQuestion:\nWhat?\n===\nAnswer:\nThat.", None, "missing_label"),
    ("conversation", "The bus is red and it rains.", None, "missing_label"),
    ("conversation", "Answer:\nRed.\n===\nQuestion:\nWhat color?", None, "turns_out_of_order"),
    ("conversation", "Question:\nA?\n===\nQuestion:\nB?\n===\nAnswer:\nC.", None, "turns_out_of_order"),
    ("conversation", "Question:\nA?\n===\nAnswer:\nB.\n===\nQuestion:\nC?", None, "unanswered_question"),
    ("conversation", "Question:\n\n===\nAnswer:\nB.", None, "empty_turn"),
    ("conversation", CONVERSATION, "length", "truncated"),
    ("conversation", "Question:\nWhat is in <image>?\n===\nAnswer:\nA bus.", None, "image_token_in_output"),
    ("complex", CONVERSATION, None, "wrong_turn_count"),
    ("complex", "Question:\nWhy is it wet?", None, "unanswered_question"),
    ("complex", "It is raining, so the street is wet.", None, "missing_label"),
    ("complex", "", None, "empty_output"),
    ("detail", "A bus.", None, "too_short"),
    ("detail", "", None, "empty_output"),
    ("detail", COMPLEX, None, "unexpected_format"),
    ("detail", DETAIL, "length", "truncated"),
])
def test_malformed_outputs_raise_with_reason(kind, text, finish, reason):
    with pytest.raises(ParseError) as err:
        build_record(kind, "x", "1.jpg", text, question="Describe this image in detail.", finish_reason=finish)
    assert err.value.reason == reason


def test_complex_parser_returns_pair():
    assert parse_complex(COMPLEX)[0] == "Why are the people holding umbrellas?"


def test_fingerprint_ignores_detail_question_and_whitespace():
    a = build_record("detail", "a", "a.jpg", DETAIL, question="Describe this image in detail.")
    b = build_record("detail", "b", "b.jpg", DETAIL.replace(" ", "  "), question="Tell me about this image in depth.")
    c = build_record("conversation", "c", "c.jpg", CONVERSATION)
    assert fingerprint(a) == fingerprint(b) != fingerprint(c)


# ---- inputs


def _coco(tmp_path):
    images = [{"id": 1, "file_name": "a.jpg", "width": 200, "height": 100},
              {"id": 2, "file_name": "b.jpg", "width": 50, "height": 50},
              {"id": 3, "file_name": "c.jpg", "width": 10, "height": 10}]
    caps = {"images": images, "annotations": [
        {"id": 10, "image_id": 1, "caption": "A dog on grass. "},
        {"id": 11, "image_id": 1, "caption": "A brown dog."},
        {"id": 12, "image_id": 2, "caption": "A cup."}]}
    inst = {"images": images, "categories": [{"id": 18, "name": "dog"}, {"id": 47, "name": "cup"}],
            "annotations": [{"id": 20, "image_id": 1, "category_id": 18, "bbox": [20, 10, 100, 80]},
                            {"id": 21, "image_id": 1, "category_id": 47, "bbox": [0, 0, 0, 5]},  # degenerate
                            {"id": 22, "image_id": 2, "category_id": 47, "bbox": [25, 25, 25, 25]}]}
    (tmp_path / "captions_x.json").write_text(json.dumps(caps))
    (tmp_path / "instances_x.json").write_text(json.dumps(inst))
    return [str(tmp_path / "captions_x.json"), str(tmp_path / "instances_x.json")]


def test_coco_boxes_are_normalised_and_context_formatted(tmp_path):
    images, errors = read_coco(_coco(tmp_path), image_prefix="train2017/")
    assert [e.reason for e in errors] == ["no_captions"]  # image 3
    a, b = images
    assert (a.key, a.image, a.captions) == ("000000000001", "train2017/a.jpg", ["A dog on grass.", "A brown dog."])
    assert [(x.category, x.bbox) for x in a.boxes] == [("dog", (0.1, 0.1, 0.6, 0.9))]
    assert b.context(with_boxes=True) == "A cup.\n\ncup: [0.5, 0.5, 1.0, 1.0]"
    assert a.context(with_boxes=False) == "A dog on grass.\nA brown dog."


def test_context_rounds_and_keeps_largest_boxes():
    img = parse_jsonl_image({"image": "x.jpg", "captions": ["c"], "width": 3, "height": 3, "boxes": [
        {"category": "small", "bbox": [0, 0, 1, 1]}, {"category": "big", "bbox": [0, 0, 3, 2]},
        {"category": "mid", "bbox": [1, 1, 3, 3]}]})
    assert img.context(True, decimals=3) == "c\n\nsmall: [0.0, 0.0, 0.333, 0.333]\nbig: [0.0, 0.0, 1.0, 0.667]\n" \
                                            "mid: [0.333, 0.333, 1.0, 1.0]"
    assert img.context(True, decimals=2, max_boxes=2) == "c\n\nbig: [0.0, 0.0, 1.0, 0.67]\nmid: [0.33, 0.33, 1.0, 1.0]"


def test_jsonl_input_pixel_or_normalised_and_bad_lines(tmp_path):
    lines = [
        {"image": "p.jpg", "id": "p", "captions": ["pixels"], "width": 100, "height": 50,
         "boxes": [{"category": "car", "bbox": [10, 5, 60, 45]}]},
        {"image": "n.jpg", "captions": ["normalised"], "boxes": [{"category": "car", "bbox": [0.1, 0.2, 0.5, 0.6]}]},
        {"image": "bad.jpg", "captions": ["x"], "boxes": [{"category": "car", "bbox": [10, 5, 60, 45]}]},
        {"image": "inv.jpg", "captions": ["x"], "boxes": [{"category": "car", "bbox": [0.5, 0.2, 0.1, 0.6]}]},
        {"image": "/abs/path.jpg", "captions": ["x"]},
        {"image": "nocap.jpg", "captions": []},
        {"image": "p.jpg", "captions": ["again"]},
    ]
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n{broken\n")
    images, errors = read_inputs(str(path), "jsonl")
    assert [(i.key, i.image) for i in images] == [("p", "p.jpg"), ("n.jpg", "n.jpg")]
    assert images[0].boxes[0].bbox == (0.1, 0.1, 0.6, 0.9)
    assert images[1].boxes[0].bbox == (0.1, 0.2, 0.5, 0.6)
    reasons = sorted(e.reason for e in errors)
    assert reasons == ["bad_input"] * 4 + ["duplicate_image", "invalid_json"]
    assert any("not normalised" in e.detail for e in errors) and any("inverted" in e.detail for e in errors)
    assert len(read_jsonl(str(path))[0]) == 3
    with pytest.raises(ValueError, match="valid formats: coco, jsonl"):
        read_inputs(str(path), "csv")


# ---- prompts and planning


def test_packaged_prompts_load_with_stable_distinct_hashes():
    prompts = load_prompts()
    assert set(prompts) == set(KINDS)
    hashes = {p.hash for p in prompts.values()}
    assert len(hashes) == 3 and all(len(h) == 64 for h in hashes)
    assert load_prompt("detail").hash == prompts["detail"].hash
    assert not prompts["conversation"].uses_boxes and prompts["detail"].uses_boxes and prompts["complex"].uses_boxes
    assert len(prompts["detail"].questions) >= 10
    msgs = prompts["complex"].messages("CTX")
    assert msgs[0]["role"] == "system" and msgs[-1] == {"role": "user", "content": "CTX"}
    assert [m["role"] for m in msgs[1:-1]] == ["user", "assistant"] * len(prompts["complex"].examples)
    # the few-shot responses follow the format the parser expects
    for kind in ("conversation", "complex"):
        for _ctx, resp in prompts[kind].examples:
            build_record(kind, "x", "x.jpg", resp)
    for ctx, resp in prompts["detail"].examples:
        build_record("detail", "x", "x.jpg", resp, question="q")
        assert "\n\n" in ctx and ": [" in ctx  # boxes in the context


def test_custom_prompt_folder_changes_hash_and_errors_name_the_file(tmp_path):
    text = load_prompt("complex").to_json()
    text["system"] += " Be concise."
    import yaml

    (tmp_path / "complex.yaml").write_text(yaml.safe_dump(text))
    assert load_prompt("complex", str(tmp_path)).hash != load_prompt("complex").hash
    with pytest.raises(PromptError, match="detail.yaml"):
        load_prompt("detail", str(tmp_path))
    (tmp_path / "conversation.yaml").write_text("kind: conversation\nsystem: ''\n")
    with pytest.raises(PromptError, match="'system'"):
        load_prompt("conversation", str(tmp_path))
    with pytest.raises(PromptError, match="valid kinds"):
        load_prompt("poem")


def test_plan_targets_seeded_questions_and_context_per_kind():
    images = [ImageContext(key=f"k{i}", image=f"{i}.jpg", captions=[f"cap {i}"],
                           boxes=parse_jsonl_image({"image": "x.jpg", "captions": ["c"], "boxes": [
                               {"category": "cat", "bbox": [0.1, 0.1, 0.5, 0.5]}]}).boxes) for i in range(10)]
    prompts = load_prompts()
    tasks = plan_tasks(images, prompts, {"conversation": 4, "detail": 100, "complex": 0}, seed=1)
    kinds = [t["kind"] for t in tasks]
    assert kinds.count("conversation") == 4 and kinds.count("detail") == 10 and kinds.count("complex") == 0
    assert len({t["task_id"] for t in tasks}) == len(tasks)
    conv = [t for t in tasks if t["kind"] == "conversation"]
    assert all("cat:" not in t["context"] for t in conv)
    detail = [t for t in tasks if t["kind"] == "detail"]
    assert all("cat: [0.1, 0.1, 0.5, 0.5]" in t["context"] for t in detail)
    assert all(t["question"] in prompts["detail"].questions for t in detail)
    assert len({t["question"] for t in detail}) > 1
    again = plan_tasks(images, prompts, {"conversation": 4, "detail": 100, "complex": 0}, seed=1)
    other = plan_tasks(images, prompts, {"conversation": 4, "detail": 100, "complex": 0}, seed=2)
    assert again == tasks
    assert [t["question"] for t in other if t["kind"] == "detail"] != [t["question"] for t in detail]


def test_collect_drops_duplicates_into_quarantine():
    def ok(task_id, kind, text, q=None):
        return {"task_id": task_id, "kind": kind, "image": f"{task_id}.jpg", "status": "ok",
                "record": build_record(kind, task_id, f"{task_id}.jpg", text, question=q)}

    rows = [ok("a", "complex", COMPLEX), ok("b", "complex", COMPLEX), ok("c", "detail", DETAIL, "q1"),
            ok("d", "detail", DETAIL, "q2"),
            {"task_id": "e", "kind": "conversation", "image": "e.jpg", "status": "quarantined",
             "reason": "missing_label", "detail": "...", "raw": "hello"}]
    records, errors = collect(rows)
    assert [r.id for r in records["complex"]] == ["a"] and [r.id for r in records["detail"]] == ["c"]
    assert [(e["task_id"], e["reason"]) for e in errors] == [
        ("b", "duplicate_conversation"), ("d", "duplicate_conversation"), ("e", "missing_label")]


def test_tiny_preset_has_a_generate_section():

    from vitune.config import GenerateJobConfig, load_config

    cfg = load_config(GenerateJobConfig, "tiny",
                      ["generate.input=data/in.jsonl", "generate.endpoint.requests_per_second=null"])
    assert cfg.generate.format == "jsonl" and cfg.generate.input == "data/in.jsonl"
    assert cfg.generate.endpoint.requests_per_second is None and cfg.generate.targets.complex == 77
