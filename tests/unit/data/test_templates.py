"""Templates render LLaVA's exact strings; label masks train exactly the replies and their end separators."""

from __future__ import annotations

import itertools
import json
import random
import re

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from vitune import IGNORE_INDEX, IMAGE_TOKEN
from vitune.data.inspect import inspect_records, main, mark_trained
from vitune.data.masks import (
    MaskError,
    bos_ids,
    tokenize_conversation,
    tokenize_generation_prompt,
    tokenize_record,
)
from vitune.data.records import Turn, validate_record
from vitune.data.templates import (
    TEMPLATES,
    TemplateError,
    get_template,
    render_conversation,
    render_generation_prompt,
    with_system,
)
from vitune.data.tokenizer import load_tokenizer

CONV = [
    {"from": "human", "value": "What is unusual here?\n<image>"},
    {"from": "gpt", "value": "A man irons clothes on a taxi."},
    {"from": "human", "value": "Is it safe?"},
    {"from": "gpt", "value": "No, it is not."},
]
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
LLAVA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
LLAMA_2_SYSTEM = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being "
    "safe.  Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or illegal "
    "content. Please ensure that your responses are socially unbiased and positive in nature.\n\nIf a question "
    "does not make any sense, or is not factually coherent, explain why instead of answering something not "
    "correct. If you don't know the answer to a question, please don't share false information."
)
LLAVA_LLAMA_2_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that the "
    "user provides, and assist the user with a variety of tasks using natural language."
)

# (full training string, generation prompt after the first three turns), written from LLaVA's get_prompt()
EXPECTED = {
    "vicuna_v1": (
        VICUNA_SYSTEM + " USER: <image>\nWhat is unusual here? ASSISTANT: A man irons clothes on a taxi.</s>"
        "USER: Is it safe? ASSISTANT: No, it is not.</s>",
        VICUNA_SYSTEM + " USER: <image>\nWhat is unusual here? ASSISTANT: A man irons clothes on a taxi.</s>"
        "USER: Is it safe? ASSISTANT:",
    ),
    "llava_v1": (
        LLAVA_V1_SYSTEM + " USER: <image>\nWhat is unusual here? ASSISTANT: A man irons clothes on a taxi.</s>"
        "USER: Is it safe? ASSISTANT: No, it is not.</s>",
        LLAVA_V1_SYSTEM + " USER: <image>\nWhat is unusual here? ASSISTANT: A man irons clothes on a taxi.</s>"
        "USER: Is it safe? ASSISTANT:",
    ),
    "llama_2": (
        "[INST] <<SYS>>\n" + LLAMA_2_SYSTEM + "\n<</SYS>>\n\n<image>\nWhat is unusual here? [/INST] "
        "A man irons clothes on a taxi. </s><s>[INST] Is it safe? [/INST] No, it is not. </s>",
        "[INST] <<SYS>>\n" + LLAMA_2_SYSTEM + "\n<</SYS>>\n\n<image>\nWhat is unusual here? [/INST] "
        "A man irons clothes on a taxi. </s><s>[INST] Is it safe? [/INST]",
    ),
    "llava_llama_2": (
        "[INST] <<SYS>>\n" + LLAVA_LLAMA_2_SYSTEM + "\n<</SYS>>\n\n<image>\nWhat is unusual here? [/INST] "
        "A man irons clothes on a taxi. </s><s>[INST] Is it safe? [/INST] No, it is not. </s>",
        "[INST] <<SYS>>\n" + LLAVA_LLAMA_2_SYSTEM + "\n<</SYS>>\n\n<image>\nWhat is unusual here? [/INST] "
        "A man irons clothes on a taxi. </s><s>[INST] Is it safe? [/INST]",
    ),
    "chatml_direct": (
        "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\nWhat is unusual here?"
        "<|im_end|><|im_start|>assistant\nA man irons clothes on a taxi.<|im_end|><|im_start|>user\nIs it safe?"
        "<|im_end|><|im_start|>assistant\nNo, it is not.<|im_end|>",
        "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\nWhat is unusual here?"
        "<|im_end|><|im_start|>assistant\nA man irons clothes on a taxi.<|im_end|><|im_start|>user\nIs it safe?"
        "<|im_end|><|im_start|>assistant\n",
    ),
    # the tiny tokenizer's own chat template
    "chat_template": (
        "<s><|user|>\n<image>\nWhat is unusual here?\n<|assistant|>\nA man irons clothes on a taxi.</s>\n"
        "<|user|>\nIs it safe?\n<|assistant|>\nNo, it is not.</s>\n",
        "<s><|user|>\n<image>\nWhat is unusual here?\n<|assistant|>\nA man irons clothes on a taxi.</s>\n"
        "<|user|>\nIs it safe?\n<|assistant|>\n",
    ),
}


@pytest.fixture(scope="module")
def tiny():
    return load_tokenizer("tiny")


CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def spm_like():
    """A Llama-style tokenizer: metaspace ("▁") pieces, byte fallback, BOS added, ChatML special tokens."""
    specials = ["<unk>", "<s>", "</s>", IMAGE_TOKEN, "<|im_start|>", "<|im_end|>"]
    corpus = [render_conversation(CONV, name) for name in EXPECTED if name != "chat_template"]
    corpus += ["the a cat dog sat on mat table photo picture red blue green what is this describe"] * 3
    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>"))
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer_tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=specials))
    model = json.loads(trainer_tok.to_str())["model"]
    vocab = dict(model["vocab"])
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    tok.add_special_tokens(specials)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<unk>",
        extra_special_tokens=[IMAGE_TOKEN, "<|im_start|>", "<|im_end|>"],
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


# ---------------------------------------------------------------- registry and rendering


def test_registry_lists_valid_names_on_unknown():
    # LLaVA-NeXT's templates are checked against its own renderings in test_llava_next_templates.py
    llava_next = {"qwen_1_5", "qwen_2", "llava_llama_3", "mistral_instruct"}
    assert set(TEMPLATES) == set(EXPECTED) | {"plain"} | llava_next
    with pytest.raises(ValueError, match="unknown conversation template 'vicuna'.*plain, vicuna_v1, llava_v1"):
        get_template("vicuna")
    assert get_template(TEMPLATES["plain"]) is TEMPLATES["plain"]


@pytest.mark.parametrize("name", list(EXPECTED))
def test_render_matches_llava_get_prompt(name, tiny):
    full, prompt = EXPECTED[name]
    assert render_conversation(CONV, name, tiny) == full
    assert render_generation_prompt(CONV[:3], name, tiny) == prompt
    turns = [Turn(t["from"], t["value"]) for t in CONV]
    assert render_conversation(turns, name, tiny) == full


def test_render_plain_drops_the_human_text(tiny):
    assert render_conversation(CONV[:2], "plain") == "<image>A man irons clothes on a taxi.\n"
    assert render_generation_prompt(CONV[:1], "plain") == "<image>"


def test_render_text_only_record_and_image_only_turn():
    text = [{"from": "human", "value": "Hi there"}, {"from": "gpt", "value": "Hello."}]
    assert render_conversation(text, "vicuna_v1") == VICUNA_SYSTEM + " USER: Hi there ASSISTANT: Hello.</s>"
    only_image = [{"from": "human", "value": " <image> "}, {"from": "gpt", "value": "A dog."}]
    assert render_conversation(only_image, "vicuna_v1") == VICUNA_SYSTEM + " USER: <image> ASSISTANT: A dog.</s>"


def test_chat_template_needs_a_tokenizer_with_one(tiny):
    with pytest.raises(ValueError, match="needs a tokenizer that has a chat template"):
        render_conversation(CONV, "chat_template")


# ---------------------------------------------------------------- masks on random conversations

WORDS = [
    "cat", "dog", "the", "table", "red", "photo", "café", "naïve", "日本語", "Ωmega", "straße", "🚀", "x²",
    "(left)", "3.14", "don't", "—", "ok!", "multi-word", "ASSISTANT", "USER:", "[INST]", "<b>", "\\n",
]  # fmt: skip
SPACES = [" ", " ", " ", "  ", "\n", "\t", " \n ", "\n\n"]


def random_text(rng: random.Random) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(1, 12))]
    text = "".join(w + rng.choice(SPACES) for w in words).rstrip(" \n\t")
    return rng.choice(["", " ", "\n", "  "]) + text + rng.choice(["", " ", "\n", " \t"])


def random_conversation(rng: random.Random, rounds: int, image: bool) -> list[dict[str, str]]:
    turns = []
    for _ in range(rounds):
        turns += [{"from": "human", "value": random_text(rng)}, {"from": "gpt", "value": random_text(rng)}]
    if image:
        q = turns[0]["value"]
        turns[0]["value"] = rng.choice([f"{IMAGE_TOKEN}\n{q}", f"{q}\n{IMAGE_TOKEN}", f"{q} {IMAGE_TOKEN} {q}"])
    return turns


def expected_trained(name: str, tokenizer_name: str, replies: list[str]) -> list[str]:
    """The trained text of each reply, written down from the LLaVA rules (independent of the implementation)."""
    if name in ("vicuna_v1", "llava_v1"):
        return [f" {r}</s>" for r in replies]
    if name == "plain":
        return [f"{r}\n" for r in replies]
    if name in ("llama_2", "llava_llama_2"):
        return [f" {r} </s>" for r in replies]
    if name == "chatml_direct":
        return [f"{r}<|im_end|>" for r in replies]
    end = "</s>" if tokenizer_name == "tiny" else "<|im_end|>"
    return [f"{r}{end}" for r in replies]


def decode_exact(tokenizer, ids: list[int], tokenizer_name: str) -> str:
    """Lossless decode: byte-level BPE decodes itself; metaspace pieces map "▁" → " " and <0xNN> → bytes."""
    if tokenizer_name == "tiny":
        return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    out = b""
    for piece in tokenizer.convert_ids_to_tokens(ids):
        m = re.fullmatch(r"<0x([0-9A-F]{2})>", piece)
        out += bytes([int(m.group(1), 16)]) if m else piece.replace("▁", " ").encode()
    return out.decode()


def trained_runs(sample) -> list[list[int]]:
    pairs = zip(sample.input_ids, sample.labels, strict=True)
    return [
        [i for i, _ in run] for trained, run in itertools.groupby(pairs, key=lambda p: p[1] != IGNORE_INDEX) if trained
    ]


@pytest.mark.parametrize("tokenizer_name", ["tiny", "spm_like"])
@pytest.mark.parametrize("name", ["vicuna_v1", "plain", "llama_2", "chatml_direct", "chat_template"])
def test_trained_tokens_are_exactly_the_replies(name, tokenizer_name, request):
    tokenizer = request.getfixturevalue(tokenizer_name)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    rng = random.Random(f"{name}-{tokenizer_name}")
    for trial in range(25):
        image = name == "plain" or trial % 3 != 0
        conv = random_conversation(rng, 1 if name == "plain" else rng.randint(1, 3), image)
        sample = tokenize_conversation(conv, name, tokenizer, max_length=4096, record_id=f"r{trial}")
        replies = [t["value"] for t in conv[1::2]]
        expected = expected_trained(name, tokenizer_name, replies)
        if tokenizer_name == "spm_like":  # each separately tokenized reply gets the dummy-prefix space
            expected = [e if e.startswith(" ") else " " + e for e in expected]
        got = [decode_exact(tokenizer, run, tokenizer_name) for run in trained_runs(sample)]
        assert got == expected, conv
        assert all(lab in (IGNORE_INDEX, i) for i, lab in zip(sample.input_ids, sample.labels, strict=True))
        assert sample.num_trained == sum(map(len, trained_runs(sample))) and not sample.truncated
        assert sample.input_ids.count(image_id) == (1 if image else 0)
        assert image_id not in [lab for lab in sample.labels if lab != IGNORE_INDEX]
        bos = tokenizer.bos_token_id
        if name == "chat_template" and tokenizer_name == "spm_like":
            assert bos not in sample.input_ids  # a chat template writes its own BOS; this one writes none
        else:
            assert sample.input_ids[0] == bos and sample.input_ids[1] != bos  # exactly one BOS


@pytest.mark.parametrize("tokenizer_name", ["tiny", "spm_like"])
@pytest.mark.parametrize("name", list(EXPECTED) + ["plain"])
def test_generation_prompt_is_the_prefix_of_training_ids(name, tokenizer_name, request):
    tokenizer = request.getfixturevalue(tokenizer_name)
    rng = random.Random(name)
    for _ in range(5):
        conv = random_conversation(rng, 1 if name == "plain" else 3, image=True)
        sample = tokenize_conversation(conv, name, tokenizer, max_length=4096)
        for k in range(1, len(conv), 2):
            prompt = tokenize_generation_prompt(conv[:k], name, tokenizer)
            assert sample.input_ids[: len(prompt)] == prompt
            assert sample.labels[len(prompt) - 1] == IGNORE_INDEX and sample.labels[len(prompt)] != IGNORE_INDEX


@pytest.mark.parametrize("name", ["vicuna_v1", "llava_v1", "llama_2", "plain"])
def test_segment_ids_equal_whole_string_ids_for_byte_level_bpe(name, tiny):
    """For byte-level BPE the segment boundaries sit on pre-token boundaries: no id changes."""
    rng = random.Random(0)
    for _ in range(20):
        conv = random_conversation(rng, 1 if name == "plain" else 2, image=True)
        sample = tokenize_conversation(conv, name, tiny, max_length=4096)
        assert sample.input_ids == tiny(render_conversation(conv, name))["input_ids"]


def test_bos_only_when_the_tokenizer_adds_one(tiny, spm_like):
    assert bos_ids(tiny) == [tiny.bos_token_id] and bos_ids(spm_like) == [spm_like.bos_token_id]
    no_bos = load_tokenizer("tiny")
    no_bos.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A", special_tokens=[])
    assert bos_ids(no_bos) == []
    sample = tokenize_conversation(CONV, "vicuna_v1", no_bos, max_length=4096)
    assert no_bos.bos_token_id not in sample.input_ids


# ---------------------------------------------------------------- truncation and mask errors


def test_truncation_keeps_the_surviving_reply_tokens(tiny):
    full = tokenize_conversation(CONV, "vicuna_v1", tiny, max_length=4096)
    first_trained = next(i for i, lab in enumerate(full.labels) if lab != IGNORE_INDEX)
    cut = first_trained + 3
    sample = tokenize_conversation(CONV, "vicuna_v1", tiny, max_length=cut)
    assert sample.truncated and len(sample.input_ids) == len(sample.labels) == cut
    assert sample.input_ids == full.input_ids[:cut] and sample.labels == full.labels[:cut]
    assert sample.num_trained == 3


def test_no_trained_token_after_truncation_is_a_mask_error(tiny):
    full = tokenize_conversation(CONV, "vicuna_v1", tiny, max_length=4096)
    first_trained = next(i for i, lab in enumerate(full.labels) if lab != IGNORE_INDEX)
    with pytest.raises(MaskError, match=r"record 'r-9': no trained token survives truncation") as info:
        tokenize_conversation(CONV, "vicuna_v1", tiny, max_length=first_trained, record_id="r-9")
    assert info.value.kind == "no_trained_tokens"


def test_truncating_the_image_token_is_a_mask_error(tiny):
    with pytest.raises(MaskError, match=r"record 'r-1': truncation to 5 tokens cuts the <image> token"):
        tokenize_conversation(CONV, "vicuna_v1", tiny, max_length=5, record_id="r-1")


@pytest.mark.parametrize(
    ("name", "conv", "words"),
    [
        ("plain", CONV, "one human + one gpt turn"),
        ("plain", [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "a"}], "needs <image>"),
        ("vicuna_v1", CONV[:3], "must end with a gpt turn"),
        ("vicuna_v1", [CONV[1], CONV[0]], "turn 0 is from 'gpt'"),
        ("vicuna_v1", [CONV[0], {"from": "gpt", "value": "see <image>"}], "<image> appears in an assistant reply"),
    ],
)
def test_template_mismatch_is_a_mask_error_naming_the_record(name, conv, words, tiny):
    with pytest.raises(MaskError) as info:
        tokenize_conversation(conv, name, tiny, max_length=4096, record_id="rec-42")
    assert str(info.value).startswith("record 'rec-42': ") and words in str(info.value)
    assert f"template {name!r}" in str(info.value)


def test_chat_template_trains_up_to_the_first_end_marker():
    tok = load_tokenizer("tiny")
    tok.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s><pad>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    sample = tokenize_conversation(CONV, "chat_template", tok, max_length=4096)
    got = [tok.decode(run, skip_special_tokens=False) for run in trained_runs(sample)]
    assert got == ["A man irons clothes on a taxi.</s>", "No, it is not.</s>"]


def test_generation_prompt_needs_a_final_human_turn(tiny):
    with pytest.raises(ValueError, match="end with a human turn"):
        tokenize_generation_prompt(CONV, "vicuna_v1", tiny)
    image_only = tokenize_generation_prompt(CONV[:1], "plain", tiny)
    assert image_only == [tiny.bos_token_id, tiny.convert_tokens_to_ids(IMAGE_TOKEN)]


def test_chat_template_without_end_marker_is_a_mask_error():
    tok = load_tokenizer("tiny")
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(MaskError, match="record 'c': the chat template emits no end-of-turn marker"):
        tokenize_conversation(CONV, "chat_template", tok, max_length=4096, record_id="c")


def test_chat_template_that_is_not_prefix_stable_is_a_mask_error():
    tok = load_tokenizer("tiny")
    # numbers each message by the conversation length: earlier text changes as turns are added
    tok.chat_template = "{% for m in messages %}[{{ messages|length }}] {{ m['content'] }}</s>{% endfor %}"
    with pytest.raises(MaskError, match="cannot locate the reply"):
        tokenize_conversation(CONV, "chat_template", tok, max_length=4096, record_id="c")


def test_tokenizer_without_image_token_is_a_mask_error():
    word_level = Tokenizer(models.WordLevel(vocab={"<unk>": 0, "a": 1}, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="<unk>")
    with pytest.raises(MaskError, match="record 'x': the tokenizer has no <image> token"):
        tokenize_conversation(CONV, "vicuna_v1", tok, max_length=64, record_id="x")


def test_tokenize_record_names_the_record(tiny):
    rec = validate_record({"id": "cap-1", "image": "a.jpg", "conversations": CONV})
    with pytest.raises(MaskError, match="record 'cap-1'"):
        tokenize_record(rec, "plain", tiny, max_length=64)
    assert tokenize_record(rec, "vicuna_v1", tiny, max_length=4096).num_trained > 0


# ---------------------------------------------------------------- data inspect


def test_inspect_reports_samples_and_skips(tmp_path, tiny, capsys):
    rows = [
        {"id": "ok-1", "image": "a.jpg", "conversations": CONV[:2]},
        {"id": "ok-2", "image": "b.jpg", "conversations": CONV},  # plain rejects 4 turns: MaskError
        {"id": "bad", "image": "/abs.jpg", "conversations": CONV[:2]},  # invalid record
        {"id": "txt", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
    ]
    path = tmp_path / "recs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    report = inspect_records(str(path), "plain", "tiny", max_length=512, show=2)
    assert report["records_in"] == 4 and report["records_ok"] == 1 and report["skipped"] == 3
    assert report["skipped_by_reason"] == {"template_mismatch": 2, "bad_image_path": 1}
    assert report["samples"] == [
        {"id": "ok-1", "image": "a.jpg", "text": "<s><image>[[A man irons clothes on a taxi.\n]]"}
    ]
    assert 0 < report["trained_share"] < 1 and report["truncated"] == 0

    assert main([str(path), "--template", "vicuna_v1", "--show", "1"]) == 0
    out = capsys.readouterr().out
    assert "[[ A man irons clothes on a taxi.</s>]]" in out and "records:        3 of 4 usable" in out
    assert "bad_image_path: 1" in out and "record 'bad'" in out


def test_mark_trained_wraps_every_reply(tiny):
    sample = tokenize_conversation(CONV, "chatml_direct", tiny, max_length=4096)
    text = mark_trained(sample, tiny)
    assert text.count("[[") == 2
    assert "[[A man irons clothes on a taxi.<|im_end|>]]" in text and "[[No, it is not.<|im_end|>]]" in text


@pytest.mark.parametrize(("name", "start"), [
    ("vicuna_v1", "Be brief. USER:"),
    ("llama_2", "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n"),
    ("chatml_direct", "<|im_start|>system\nBe brief.<|im_end|><|im_start|>user\n"),
])
def test_with_system_replaces_the_system_prompt(name, start):
    turns = [{"from": "human", "value": "hi"}]
    assert render_generation_prompt(turns, with_system(name, "Be brief.")).startswith(start)
    assert with_system(name, None) is get_template(name)


@pytest.mark.parametrize("name", ["plain", "chat_template"])
def test_with_system_refuses_templates_without_a_system_prompt(name):
    with pytest.raises(TemplateError, match="no system prompt"):
        with_system(name, "Be brief.")
