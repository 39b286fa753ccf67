"""The tiny Qwen2-shaped LM (`lm: tiny-qwen2`) and its offline Qwen2-like tokenizer, with the ChatML templates."""

from __future__ import annotations

import pytest
import torch

from vitune import IGNORE_INDEX, IMAGE_TOKEN
from vitune.data import tokenizer as tokenizer_lib
from vitune.data.masks import tokenize_conversation
from vitune.data.templates import stop_token_ids
from vitune.data.tokenizer import load_tokenizer
from vitune.model.vlm import TINY_LMS, build_model, load_lm

CONV = [
    {"from": "human", "value": "<image>\nWhat color is the square?"},
    {"from": "gpt", "value": "red"},
    {"from": "human", "value": "Where is it?"},
    {"from": "gpt", "value": "top left"},
]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny-qwen2")


def test_tokenizer_has_qwen2_specials_and_no_bos(tok):
    endoftext = tok.convert_tokens_to_ids("<|endoftext|>")
    assert tok.bos_token is None and tok.eos_token_id == endoftext and tok.pad_token_id == endoftext
    ids = tok("a <|im_start|>user <|im_end|> " + IMAGE_TOKEN)["input_ids"]
    for special in ("<|im_start|>", "<|im_end|>", IMAGE_TOKEN):
        assert tok.convert_tokens_to_ids(special) in ids  # one token each, never split
    assert tok("a red square")["input_ids"][0] != endoftext  # nothing prepended


def test_shipped_tokenizers_rebuild_byte_for_byte(tmp_path):
    # `tiny` must stay what every test and the demo were built on; tiny-qwen2 must be reproducible
    built = tokenizer_lib.build_tiny_tokenizer(tmp_path / "tiny")
    assert (built / "tokenizer.json").read_bytes() == (tokenizer_lib.TINY_DIR / "tokenizer.json").read_bytes()
    built = tokenizer_lib.build_tiny_qwen2_tokenizer(tmp_path / "qwen2")
    assert (built / "tokenizer.json").read_bytes() == (tokenizer_lib.TINY_QWEN2_DIR / "tokenizer.json").read_bytes()


def test_tiny_qwen2_is_qwen2_shaped_and_the_same_every_time(tok):
    lm = load_lm("tiny-qwen2", tok)
    cfg = lm.config
    assert type(lm).__name__ == "Qwen2ForCausalLM"
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (64, 2, 4, 2)
    # untied as Qwen2-7B (see build_tiny_qwen2_lm: tied, the tiny model learned far slower)
    assert not cfg.tie_word_embeddings and lm.lm_head.weight.data_ptr() != lm.get_input_embeddings().weight.data_ptr()
    attn = lm.model.layers[0].self_attn
    assert attn.q_proj.bias is not None and attn.o_proj.bias is None  # Qwen2: bias on q/k/v only
    assert cfg.vocab_size == len(tok) and cfg.eos_token_id == tok.eos_token_id
    again = load_lm("tiny-qwen2", tok)
    assert all(torch.equal(a, b) for a, b in zip(lm.state_dict().values(), again.state_dict().values(), strict=True))


def test_tiny_lm_registry_names_its_tokenizers_and_rejects_unknown_names(tok):
    for name, entry in TINY_LMS.items():
        assert entry.tokenizer in tokenizer_lib.TINY_TOKENIZERS, name
    assert TINY_LMS["tiny-qwen2"].tokenizer == "tiny-qwen2"  # tokenizer: null → the lm's name
    with pytest.raises(ValueError, match=r"tiny-qwen.*'tiny', 'tiny-qwen2'"):
        load_lm("tiny-qwen", tok)


@pytest.mark.parametrize("template", ["qwen_1_5", "qwen_2"])
def test_chatml_labels_follow_preprocess_qwen(tok, template):
    # LLaVA-NeXT's preprocess_qwen trains each whole assistant message (header, reply, <|im_end|>, "\n") and the
    # ChatML markers and newlines wherever they are; no system or user text is trained
    sample = tokenize_conversation(CONV, template, tok, 256)
    trained = [i for i, label in zip(sample.input_ids, sample.labels, strict=True) if label != IGNORE_INDEX]
    assert all(label in (IGNORE_INDEX, i) for i, label in zip(sample.input_ids, sample.labels, strict=True))
    text = tok.decode(trained)
    for reply in ("red", "top left"):
        assert f"<|im_start|>assistant\n{reply}<|im_end|>\n" in text
    words = text.replace("<|im_start|>", "").replace("<|im_end|>", "").replace("\n", "")
    assert words == "assistantredassistanttop left"
    assert stop_token_ids(template, tok) == [tok.convert_tokens_to_ids("<|im_end|>")]


def test_generation_stops_at_im_end(tok):
    model = build_model(type("M", (), {"lm": "tiny-qwen2", "projector": "linear"})(), tok, 8).eval()
    prompt = tok("<|im_start|>user\nred<|im_end|>\n<|im_start|>assistant\n")["input_ids"]
    with torch.no_grad():
        free = model.generate([prompt], [None], max_new_tokens=6)[0]
        # force <|im_end|> to be the third token's choice by making it the stop: the reply ends before it
        stops = [*model.eos_token_ids, free[2], *stop_token_ids("qwen_1_5", tok)]
        cut = model.generate([prompt], [None], max_new_tokens=6, stop_token_ids=stops)[0]
    assert cut == free[: min(free.index(t) for t in stops if t in free)]
    assert tok.eos_token_id in model.eos_token_ids
