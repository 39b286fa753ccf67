"""Label masks with the tokenizer kinds real LLaVA models use: sentencepiece-style Llama/Vicuna and ChatML BPE.

The official intent (haotian-liu/LLaVA ``llava/train/train.py``): ``preprocess_v1`` (Vicuna / LLaVA-v1,
``SepStyle.TWO``) and ``preprocess_llama_2`` mask each round's instruction up to and including the assistant
cue and train the reply plus its end separator ``</s>`` (the BOS counted in each round's length stands in
for the ``</s>``); ``preprocess_mpt`` (ChatML, ``chatml_direct``) trains the reply plus ``<|im_end|>``.
LLaVA gets there by offset arithmetic on separately tokenized rounds (``- 2`` per instruction, and ``- 1``
per later round when ``not tokenizer.legacy``), which breaks as tokenizers change; vitune tokenizes segment
by segment instead. These tests check the outcome, not the arithmetic: the trained tokens are exactly each
reply and its separator, nothing of the prompt is trained, the spans start and stop at the right token,
and the ids agree with LLaVA's whole-prompt tokenization (``tokenizer_image_token``). LLaVA's
``chatml_direct`` separator is ``<|im_end|>`` with no newline after it, so no newline is trained.
"""

from __future__ import annotations

import itertools
import json
import random
from collections import Counter

import pytest

from tests.unit.data.real_tokenizers import WORDS, chatml_tokenizer, exact_text, llama_tokenizer
from vitune import IGNORE_INDEX, IMAGE_TOKEN
from vitune.data.masks import tokenize_conversation, tokenize_generation_prompt
from vitune.data.templates import render_conversation
from vitune.train.data import DataStats, tokenize_records

CONV = [
    {"from": "human", "value": "What is unusual here?\n<image>"},
    {"from": "gpt", "value": "A man irons clothes on the back of a yellow taxi."},
    {"from": "human", "value": "Is it safe?"},
    {"from": "gpt", "value": "No, it is not safe."},
    {"from": "human", "value": "Describe the picture."},
    {"from": "gpt", "value": "Two people are on the street."},
]

# template → (text a reply is trained with, text that ends the assistant cue, text that opens the next round)
RULES = {
    "vicuna_v1": (" {}</s>", "ASSISTANT:", "USER:"),
    "llava_v1": (" {}</s>", "ASSISTANT:", "USER:"),
    "llama_2": (" {} </s>", "[/INST]", "<s>"),
    "llava_llama_2": (" {} </s>", "[/INST]", "<s>"),
    "mistral_instruct": (" {} </s>", "[/INST]", "[INST]"),  # LLaVA-NeXT's: llama_2 without <s> and system
    "chatml_direct": ("{}<|im_end|>", "assistant\n", "<|im_start|>"),
}
CASES = [
    *((name, kind) for name in ("vicuna_v1", "llava_v1", "llama_2", "llava_llama_2", "mistral_instruct")
      for kind in ("llama_legacy", "llama")),
    ("chatml_direct", "chatml"),
]


@pytest.fixture(scope="module")
def tokenizers():
    return {"llama_legacy": llama_tokenizer(legacy=True), "llama": llama_tokenizer(legacy=False),
            "chatml": chatml_tokenizer()}


def conversations(seed: str) -> list[list[dict[str, str]]]:
    """``CONV`` and random multi-turn image conversations over the tokenizers' training words."""
    rng = random.Random(seed)
    out = [CONV]
    for _ in range(12):
        turns = []
        for _ in range(rng.randint(1, 4)):
            for role in ("human", "gpt"):
                text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 9)))
                turns.append({"from": role, "value": text + rng.choice(["", ".", "?", "!"])})
        first = turns[0]["value"]
        turns[0]["value"] = rng.choice([f"{IMAGE_TOKEN}\n{first}", f"{first}\n{IMAGE_TOKEN}", f"{first} {IMAGE_TOKEN}"])
        out.append(turns)
    return out


def trained_spans(labels: list[int]) -> list[tuple[int, int]]:
    """``[start, end)`` of each run of trained labels."""
    spans, pos = [], 0
    for trained, run in itertools.groupby(labels, key=lambda lab: lab != IGNORE_INDEX):
        n = len(list(run))
        if trained:
            spans.append((pos, pos + n))
        pos += n
    return spans


def llava_ids(text: str, tokenizer) -> list[int]:
    """LLaVA's ``tokenizer_image_token``: chunks between ``<image>`` tokenized with BOS, later chunks' BOS dropped."""
    ids: list[int] = []
    for j, chunk in enumerate(text.split(IMAGE_TOKEN)):
        chunk_ids = tokenizer(chunk)["input_ids"]
        if j:
            ids.append(tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
            if chunk_ids[:1] == [tokenizer.bos_token_id]:
                chunk_ids = chunk_ids[1:]
        ids += chunk_ids
    return ids


def test_tokenizers_are_realistic(tokenizers):
    """Multi-character pieces, Llama's BOS and byte fallback, ChatML specials as single ids and no BOS."""
    for kind, tok in tokenizers.items():
        text = "What is unusual here? A man irons clothes on the back of a yellow taxi."
        pieces = tok.convert_ids_to_tokens(tok(text, add_special_tokens=False)["input_ids"])
        assert len(pieces) <= len(text.split()) + 2, (kind, pieces)  # about a piece per word, not per byte
        assert len(tok(IMAGE_TOKEN, add_special_tokens=False)["input_ids"]) == 1
    llama = tokenizers["llama"]
    assert llama("a")["input_ids"][0] == llama.bos_token_id == llama.convert_tokens_to_ids("<s>")
    assert llama.convert_ids_to_tokens(llama("ẞ", add_special_tokens=False)["input_ids"])[-1].startswith("<0x")
    assert llama.convert_ids_to_tokens(llama(" A man")["input_ids"]) == ["<s>", "▁A", "▁man"]  # no extra "▁"
    chatml = tokenizers["chatml"]
    assert chatml.bos_token_id is None
    assert chatml("a")["input_ids"] == chatml("a", add_special_tokens=False)["input_ids"]
    for special in ("<|im_start|>", "<|im_end|>"):
        assert len(chatml(special)["input_ids"]) == 1


@pytest.mark.parametrize(("name", "kind"), CASES)
def test_trained_tokens_are_each_reply_and_its_end_separator(name, kind, tokenizers):
    """Every trained span decodes to exactly one reply + its separator; every other label is ignored."""
    tok = tokenizers[kind]
    reply_format, _, _ = RULES[name]
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    for conv in conversations(f"{name}-{kind}"):
        sample = tokenize_conversation(conv, name, tok, max_length=4096, record_id="r")
        ids, labels = sample.input_ids, sample.labels
        spans = trained_spans(labels)
        assert [exact_text(tok, ids[s:e]) for s, e in spans] == [reply_format.format(t["value"]) for t in conv[1::2]]
        assert all(lab in (IGNORE_INDEX, i) for i, lab in zip(ids, labels, strict=True))
        assert sample.num_trained == sum(e - s for s, e in spans)
        assert ids.count(image_id) == 1 and labels[ids.index(image_id)] == IGNORE_INDEX
        if kind != "chatml":  # one BOS in front; LLAMA_2 also writes "<s>" (the same id) before each later round
            later_rounds = len(spans) - 1 if name.endswith("llama_2") else 0
            assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1 + later_rounds


@pytest.mark.parametrize(("name", "kind"), CASES)
def test_no_off_by_one_at_turn_boundaries(name, kind, tokenizers):
    """The token before each span closes the assistant cue, the span ends on the separator's own id, the
    token after it opens the next round (or the sequence ends): neither neighbour is trained."""
    tok = tokenizers[kind]
    _, cue_end, next_round = RULES[name]
    end_id = tok.convert_tokens_to_ids("<|im_end|>" if name == "chatml_direct" else "</s>")
    for conv in conversations(f"boundary-{name}-{kind}"):
        sample = tokenize_conversation(conv, name, tok, max_length=4096)
        ids, labels = sample.input_ids, sample.labels
        spans = trained_spans(labels)
        for k, (s, e) in enumerate(spans):
            assert labels[s - 1] == IGNORE_INDEX and exact_text(tok, ids[:s]).endswith(cue_end)
            assert ids[e - 1] == end_id
            reply_text = exact_text(tok, ids[s : s + 1])
            assert conv[2 * k + 1]["value"].startswith(reply_text.lstrip(" ")[:1]), (reply_text, conv[2 * k + 1])
            if e < len(ids):
                assert labels[e] == IGNORE_INDEX and exact_text(tok, ids[e:]).lstrip(" ").startswith(next_round)
        assert spans[-1][1] == len(ids)


@pytest.mark.parametrize(("name", "kind"), CASES)
def test_ids_agree_with_llavas_whole_prompt_tokenization(name, kind, tokenizers):
    """The trained ids are exactly the ids LLaVA's ``tokenizer_image_token`` gives the reply in the whole prompt.

    The prompt ids are identical too, with one known exception: a non-legacy Llama tokenizer (dummy prefix only at the
    start of the text) writes ``USER:`` (``mistral_instruct``: ``[INST]``) after ``</s>`` without the ``▁`` prefix,
    while vitune tokenizes each later round on its own and so opens it with ``▁USER:``. Prompts are never trained
    and serving uses the same segments, so train and serve agree; the difference is stated here so that it is
    visible (LLaVA's ``- 1`` per later round for ``not tokenizer.legacy`` is the same effect seen from its side).
    """
    tok = tokenizers[kind]
    for conv in conversations(f"llava-{name}-{kind}"):
        sample = tokenize_conversation(conv, name, tok, max_length=4096)
        ref = llava_ids(render_conversation(conv, name), tok)
        if name in ("vicuna_v1", "llava_v1", "mistral_instruct") and kind == "llama":
            next_round = RULES[name][2]
            assert (exact_text(tok, sample.input_ids).replace(f"</s> {next_round}", f"</s>{next_round}")
                    == exact_text(tok, ref))
            assert sample.input_ids != ref or len(conv) == 2
            # LLaVA's trained spans end on its own </s> ids; the trained ids before each are the same
            spans = [sample.input_ids[s:e] for s, e in trained_spans(sample.labels)]
            ends = [i + 1 for i, t in enumerate(ref) if t == tok.eos_token_id]
            assert [ref[e - len(span) : e] for span, e in zip(spans, ends, strict=True)] == spans
        else:  # same ids at the same positions, so the trained ids are LLaVA's too
            assert sample.input_ids == ref


@pytest.mark.parametrize(("name", "kind"), CASES)
def test_generation_prompt_is_the_training_prefix_up_to_each_cue(name, kind, tokenizers):
    tok = tokenizers[kind]
    for conv in conversations(f"gen-{name}-{kind}"):
        sample = tokenize_conversation(conv, name, tok, max_length=4096)
        starts = [s for s, _ in trained_spans(sample.labels)]
        for k, start in zip(range(1, len(conv), 2), starts, strict=True):
            prompt = tokenize_generation_prompt(conv[:k], name, tok)
            assert prompt == sample.input_ids[:start]


def test_unalignable_records_are_counted_skips(tmp_path, tokenizers):
    """A record whose labels cannot be built is a skip under its own reason: rows in = trained + skipped."""
    tok = tokenizers["llama"]
    long_question = " ".join(["describe the picture"] * 60)
    records = [
        {"id": "ok-1", "image": "a.jpg", "conversations": CONV},
        {"id": "ok-2", "image": "b.jpg", "conversations": CONV[:2]},
        {"id": "text", "conversations": [{"from": "human", "value": "Is it safe?"}, {"from": "gpt", "value": "No."}]},
        # <image> in a reply: cannot be aligned with the one image (validation catches it)
        {"id": "img-reply", "image": "c.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat is here?"}, {"from": "gpt", "value": "This <image> here."}]},
        # ends on a human turn: no assistant span to train
        {"id": "no-reply", "image": "d.jpg", "conversations": CONV[:3]},
        # the reply starts past max_length: every label would be ignored
        {"id": "cut", "image": "e.jpg", "conversations": [
            {"from": "human", "value": f"<image>\n{long_question}"}, {"from": "gpt", "value": "Two people."}]},
    ]
    path = tmp_path / "records.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records))
    max_length = 160
    assert len(tokenize_conversation(CONV, "vicuna_v1", tok, max_length=4096).input_ids) < max_length
    rows = tokenize_records([str(path)], "vicuna_v1", tok, max_length)
    stats = DataStats.of(rows)
    assert {r.id: r.skip for r in rows} == {
        "ok-1": None, "ok-2": None, "text": None,
        "img-reply": "image_token_count", "no-reply": "roles_not_alternating", "cut": "no_trained_tokens",
    }
    assert stats.records == 6 == stats.samples + stats.skipped_total and stats.samples == 3
    assert stats.skipped == Counter({"image_token_count": 1, "roles_not_alternating": 1, "no_trained_tokens": 1})
    assert all(len(r.input_ids) == 0 for r in rows if not r.trainable)
    assert all((r.labels != IGNORE_INDEX).any() for r in rows if r.trainable)
