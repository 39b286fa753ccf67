"""Records: every validation error names the record and the problem; JSON / JSONL read-write round trips."""

from __future__ import annotations

import copy
import json

import pytest

from vitune.data.records import (
    Record,
    RecordError,
    Turn,
    normalize_image_token,
    normalize_turn_image_token,
    read_records,
    read_records_with_errors,
    validate_record,
    write_records,
)


def good(**overrides):
    raw = {
        "id": "rec-7",
        "image": "coco/000123.jpg",
        "conversations": [
            {"from": "human", "value": "What is on the table?\n<image>"},
            {"from": "gpt", "value": "A red cup."},
            {"from": "human", "value": "Is it full?"},
            {"from": "gpt", "value": "No, it is empty."},
        ],
    }
    raw.update(overrides)
    return raw


def text_only(**overrides):
    raw = {
        "id": "txt-1",
        "conversations": [{"from": "human", "value": "Hello?"}, {"from": "gpt", "value": "Hi."}],
    }
    raw.update(overrides)
    return raw


def with_turns(turns, **overrides):
    return good(conversations=turns, **overrides)


def test_valid_record_keeps_unknown_keys_and_round_trips():
    raw = good(model="gpt-4", source="coco")
    raw["conversations"][1]["weight"] = 0.5
    rec = validate_record(raw)
    assert rec.id == "rec-7" and rec.image == "coco/000123.jpg" and rec.has_image
    assert [t.from_ for t in rec.conversations] == ["human", "gpt", "human", "gpt"]
    assert rec.extra == {"model": "gpt-4", "source": "coco"}
    assert rec.conversations[1].extra == {"weight": 0.5}
    assert rec.to_json() == raw
    assert list(rec.to_json())[:3] == ["id", "image", "conversations"]


def test_text_only_record_has_no_image_key():
    rec = validate_record(text_only())
    assert rec.image is None and not rec.has_image
    assert "image" not in rec.to_json()


# (raw record, words the message must contain, kind); every message must also name the record id
ERROR_CASES = {
    "missing id": ({k: v for k, v in good().items() if k != "id"}, ["#4", "missing 'id'"], "missing_id"),
    "empty id": (good(id="  "), ["#4", "'id' is empty"], "missing_id"),
    "int id": (good(id=12), ["#4", "'id' must be a string", "int"], "bad_type"),
    "missing conversations": (
        {"id": "rec-7", "image": "a.jpg"},
        ["rec-7", "missing 'conversations'"],
        "missing_conversations",
    ),
    "empty conversations": (good(conversations=[]), ["rec-7", "'conversations' is empty"], "missing_conversations"),
    "conversations not a list": (good(conversations="hi"), ["rec-7", "must be a list", "str"], "bad_type"),
    "turn missing from": (
        with_turns([{"value": "<image> hi"}, {"from": "gpt", "value": "x"}]),
        ["rec-7", "turn 0", "missing 'from'"],
        "bad_turn",
    ),
    "turn missing value": (
        with_turns([{"from": "human", "value": "<image> hi"}, {"from": "gpt"}]),
        ["rec-7", "turn 1", "missing 'value'"],
        "bad_turn",
    ),
    "empty value": (
        with_turns([{"from": "human", "value": "<image> hi"}, {"from": "gpt", "value": " \n "}]),
        ["rec-7", "turn 1", "empty value"],
        "empty_turn",
    ),
    "value not a string": (
        with_turns([{"from": "human", "value": "<image> hi"}, {"from": "gpt", "value": ["a"]}]),
        ["rec-7", "turn 1", "'value' must be a string", "list"],
        "bad_type",
    ),
    "from not a string": (
        with_turns([{"from": 1, "value": "<image> hi"}, {"from": "gpt", "value": "a"}]),
        ["rec-7", "turn 0", "'from' must be a string"],
        "bad_type",
    ),
    "turn not an object": (with_turns(["<image> hi", "a"]), ["rec-7", "turn 0", "not an object"], "bad_type"),
    "unknown role": (
        with_turns([{"from": "user", "value": "<image> hi"}, {"from": "gpt", "value": "a"}]),
        ["rec-7", "turn 0", "'user'", "human, gpt"],
        "bad_role",
    ),
    "starts with gpt": (
        with_turns([{"from": "gpt", "value": "a"}, {"from": "human", "value": "<image> hi"}]),
        ["rec-7", "turn 0", "expected 'human'", "alternate"],
        "roles_not_alternating",
    ),
    "two humans in a row": (
        with_turns(
            [
                {"from": "human", "value": "<image> hi"},
                {"from": "human", "value": "again"},
                {"from": "gpt", "value": "a"},
            ]
        ),
        ["rec-7", "turn 1", "expected 'gpt'"],
        "roles_not_alternating",
    ),
    "odd count": (
        with_turns([{"from": "human", "value": "<image> hi"}]),
        ["rec-7", "1 turns", "must end with gpt"],
        "roles_not_alternating",
    ),
    "image but no token": (
        with_turns([{"from": "human", "value": "hi"}, {"from": "gpt", "value": "a"}]),
        ["rec-7", "<image> appears 0 times", "exactly 1"],
        "image_token_count",
    ),
    "image with two tokens": (
        with_turns(
            [
                {"from": "human", "value": "<image> hi"},
                {"from": "gpt", "value": "a"},
                {"from": "human", "value": "<image> again"},
                {"from": "gpt", "value": "b"},
            ]
        ),
        ["rec-7", "<image> appears 2 times"],
        "image_token_count",
    ),
    "token in text-only record": (
        text_only(conversations=[{"from": "human", "value": "<image> hi"}, {"from": "gpt", "value": "a"}]),
        ["txt-1", "text-only", "<image>"],
        "image_token_count",
    ),
    "token in gpt turn": (
        with_turns([{"from": "human", "value": "hi"}, {"from": "gpt", "value": "see <image>"}]),
        ["rec-7", "turn 1", "gpt reply"],
        "image_token_count",
    ),
    "absolute image path": (
        good(image="/data/coco/1.jpg"),
        ["rec-7", "/data/coco/1.jpg", "absolute"],
        "bad_image_path",
    ),
    "uri image path": (good(image="s3://b/1.jpg"), ["rec-7", "absolute"], "bad_image_path"),
    "windows image path": (good(image="C:\\data\\1.jpg"), ["rec-7", "absolute"], "bad_image_path"),
    "escaping image path": (good(image="coco/../../etc/passwd"), ["rec-7", "escapes the image root"], "bad_image_path"),
    "image not a string": (good(image=5), ["rec-7", "'image' must be a string"], "bad_type"),
    "empty image": (good(image=""), ["rec-7", "'image' is empty"], "bad_image_path"),
    "not an object": (["a", "b"], ["#4", "not a JSON object", "list"], "bad_type"),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_validation_error_names_record_and_problem(case):
    raw, words, kind = ERROR_CASES[case]
    with pytest.raises(RecordError) as info:
        validate_record(copy.deepcopy(raw), index=4)
    message = str(info.value)
    for word in words:
        assert word in message, f"{case}: {word!r} not in {message!r}"
    assert info.value.kind == kind
    assert isinstance(info.value, ValueError)
    if isinstance(raw, dict) and isinstance(raw.get("id"), str) and raw["id"].strip():
        assert message.startswith(f"record {raw['id']!r}")
    row = info.value.to_json()
    assert row["raw"] == raw and row["reason"] and row["index"] == 4


def test_image_path_with_dots_in_names_is_fine():
    assert validate_record(good(image="a..b/c.d..jpg")).image == "a..b/c.d..jpg"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("What is this? <image>", "<image>\nWhat is this?"),
        ("<image>\nWhat is this?", "<image>\nWhat is this?"),
        ("  Describe <image> the   picture. ", "<image>\nDescribe  the   picture."),
        ("<image>", "<image>"),
        (" <image>\n ", "<image>"),
        ("no token here ", "no token here "),
        # several placeholders in one message (interleaved images) stay where they are, as LLaVA-NeXT leaves them
        ("Compare <image> and <image>.", "Compare <image> and <image>."),
        ("<image><image>", "<image><image>"),
    ],
)
def test_normalize_turn_image_token_like_llava(value, expected):
    assert normalize_turn_image_token(value) == expected
    assert normalize_turn_image_token(expected) == expected  # idempotent


def test_normalize_image_token_returns_a_copy():
    rec = validate_record(good())
    out = normalize_image_token(rec)
    assert out.conversations[0].value == "<image>\nWhat is on the table?"
    assert out.conversations[1:] == rec.conversations[1:]
    assert rec.conversations[0].value == "What is on the table?\n<image>"
    assert normalize_image_token(validate_record(text_only())) == validate_record(text_only())


def test_read_json_list_and_jsonl(tmp_path):
    rows = [good(), text_only(extra_key={"a": 1})]
    (tmp_path / "r.json").write_text(json.dumps(rows))
    (tmp_path / "r.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    for name in ("r.json", "r.jsonl"):
        recs = read_records(str(tmp_path / name))
        assert [r.to_json() for r in recs] == rows


def test_read_with_errors_quarantines_and_counts_every_row(tmp_path):
    lines = [json.dumps(good()), "{not json", json.dumps(good(id="bad", image="/abs.jpg")), json.dumps(text_only())]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines))
    recs, errors = read_records_with_errors(str(path))
    assert [r.id for r in recs] == ["rec-7", "txt-1"]
    assert [e.kind for e in errors] == ["invalid_json", "bad_image_path"]
    assert "line 2" in str(errors[0]) and errors[0].raw == "{not json"
    assert "'bad'" in str(errors[1]) and errors[1].index == 2
    assert len(recs) + len(errors) == len(lines)
    with pytest.raises(RecordError, match="line 2 is not valid JSON"):
        read_records(str(path))


def test_read_folder_names_the_file(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([good()]))
    (tmp_path / "b.jsonl").write_text(json.dumps(good(id="")) + "\n")
    (tmp_path / "notes.txt").write_text("ignored")
    recs, errors = read_records_with_errors(str(tmp_path))
    assert [r.id for r in recs] == ["rec-7"]
    assert len(errors) == 1 and "b.jsonl" in str(errors[0]) and "'id' is empty" in str(errors[0])


def test_read_missing_or_broken_file_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        read_records(str(tmp_path / "nope.json"))
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(ValueError, match="broken.json is not valid JSON"):
        read_records(str(tmp_path / "broken.json"))


def test_write_records_json_and_jsonl(tmp_path):
    recs = [validate_record(good(note="é")), validate_record(text_only())]
    write_records(recs, str(tmp_path / "out.jsonl"))
    lines = (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2 and json.loads(lines[0])["note"] == "é" and "é" in lines[0]
    write_records(recs, str(tmp_path / "out.json"))
    assert isinstance(json.loads((tmp_path / "out.json").read_text()), list)
    for name in ("out.json", "out.jsonl"):
        assert read_records(str(tmp_path / name)) == recs


def test_record_dataclass_direct_construction():
    rec = Record(id="x", images=(), conversations=[Turn("human", "q"), Turn("gpt", "a")])
    assert rec.to_json() == {
        "id": "x",
        "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
    }


def interleaved(**overrides):
    """LLaVA-NeXT-Interleave's form: ``image`` a list, one ``<image>`` per image in the human turns, in order."""
    return good(**{"image": ["a/1.jpg", "b/2.jpg", "c/3.jpg"], "conversations": [
        {"from": "human", "value": "Compare <image> and <image>."},
        {"from": "gpt", "value": "The first is red."},
        {"from": "human", "value": "And this one? <image>"},
        {"from": "gpt", "value": "Blue."},
    ], **overrides})


def test_multi_image_record_is_accepted_and_round_trips_as_a_list():
    raw = interleaved(source="m4")
    rec = validate_record(raw)
    assert rec.images == ("a/1.jpg", "b/2.jpg", "c/3.jpg") and rec.has_image and rec.image == "a/1.jpg"
    assert rec.to_json() == raw and isinstance(rec.to_json()["image"], list)
    one = validate_record(good(image=["only.jpg"]))  # a list of one stays a list
    assert one.images == ("only.jpg",) and one.to_json()["image"] == ["only.jpg"]
    single = validate_record(good())  # a string stays a string
    assert single.images == ("coco/000123.jpg",) and single.to_json()["image"] == "coco/000123.jpg"
    assert validate_record(text_only()).images == ()


def test_multi_image_records_survive_write_and_read(tmp_path):
    recs = [validate_record(interleaved()), validate_record(good()), validate_record(text_only())]
    write_records(recs, str(tmp_path / "out.jsonl"))
    assert read_records(str(tmp_path / "out.jsonl")) == recs


@pytest.mark.parametrize(
    "raw, fragments, kind",
    [
        (interleaved(image=["a.jpg", "b.jpg"]), ["rec-7", "2 image(s)", "appears 3 times"], "image_token_count"),
        (interleaved(image=["a.jpg", "b.jpg", "c.jpg", "d.jpg"]), ["rec-7", "4 image(s)", "appears 3 times"],
         "image_token_count"),
        (interleaved(image=[]), ["rec-7", "empty list"], "bad_image_path"),
        (interleaved(image=["a.jpg", "/abs.jpg", "c.jpg"]), ["rec-7", "'/abs.jpg' is absolute"], "bad_image_path"),
        (interleaved(image=["a.jpg", "../up.jpg", "c.jpg"]), ["rec-7", "escapes the image root"], "bad_image_path"),
        (interleaved(image=["a.jpg", 3, "c.jpg"]), ["rec-7", "'image'[1] must be a string path"], "bad_type"),
        (interleaved(image=["a.jpg", " ", "c.jpg"]), ["rec-7", "'image'[1] is empty"], "bad_image_path"),
    ],
)
def test_multi_image_record_errors_name_the_record_and_both_counts(raw, fragments, kind):
    with pytest.raises(RecordError) as info:
        validate_record(raw)
    assert info.value.kind == kind
    for fragment in fragments:
        assert fragment in str(info.value)


def test_multi_image_count_mismatch_is_skipped_and_named_by_the_reader(tmp_path):
    lines = [json.dumps(interleaved()), json.dumps(interleaved(id="short", image=["a.jpg"]))]
    (tmp_path / "r.jsonl").write_text("\n".join(lines))
    recs, errors = read_records_with_errors(str(tmp_path / "r.jsonl"))
    assert [r.id for r in recs] == ["rec-7"]
    assert [e.kind for e in errors] == ["image_token_count"] and "'short'" in str(errors[0])


def test_normalize_leaves_a_turn_with_several_images_as_it_is():
    """LLaVA-NeXT's preprocess_multimodal moves ``<image>`` only in a message that holds exactly one."""
    out = normalize_image_token(validate_record(interleaved()))
    assert out.conversations[0].value == "Compare <image> and <image>."  # interleaved: stays in place
    assert out.conversations[2].value == "<image>\nAnd this one?"  # one token in this turn: moved, as LLaVA-NeXT
    assert normalize_turn_image_token("<image> vs <image>") == "<image> vs <image>"


def test_feature_extraction_encodes_every_image_of_every_record(tmp_path):
    from vitune.features.extract import collect_image_keys

    rows = [interleaved(), good(id="one", image="a/1.jpg"), text_only(), interleaved(id="bad", image=["x.jpg"])]
    (tmp_path / "r.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    keys, stats = collect_image_keys([str(tmp_path / "r.jsonl")])
    assert keys == ["a/1.jpg", "b/2.jpg", "c/3.jpg"]  # the invalid record's x.jpg is not encoded
    assert stats == {"records": 3, "records_invalid": 1, "records_text_only": 1}
