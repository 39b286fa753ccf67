"""Where a template's replies end in generation: ``plain`` on its newline separator, ChatML on ``<|im_end|>``
(LLaVA's eval scripts stop on ``conv.sep``); templates ending in ``</s>`` rely on the EOS the model already stops on."""

from __future__ import annotations

import pytest
import torch

from tests.unit.data.real_tokenizers import chatml_tokenizer, llama_tokenizer
from vitune.data.masks import tokenize_conversation
from vitune.data.templates import (
    TEMPLATES,
    cut_at_stop,
    render_conversation,
    stop_strings,
    stop_token_ids,
)
from vitune.data.tokenizer import load_tokenizer
from vitune.model.vlm import build_model

CAPTION = [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "a red square"}]


def test_stop_strings_are_the_separators_that_are_not_eos():
    assert stop_strings("plain") == ("\n",)
    assert stop_strings("chatml_direct") == ("<|im_end|>",)
    for name in ("vicuna_v1", "llava_v1", "llama_2", "llava_llama_2", "chat_template"):
        assert stop_strings(name) == (), name
    assert set(TEMPLATES) >= {"plain", "chatml_direct"}


@pytest.mark.parametrize("tokenizer_name", ["tiny", "llama"])
def test_plain_stops_on_the_token_its_training_ends_with(tokenizer_name):
    tok = load_tokenizer("tiny") if tokenizer_name == "tiny" else llama_tokenizer(legacy=False)
    (stop,) = stop_token_ids("plain", tok)
    sample = tokenize_conversation(CAPTION, "plain", tok, 64)
    assert render_conversation(CAPTION, "plain").endswith("a red square\n")
    assert sample.labels[-1] == stop  # the trained caption ends with exactly this token


def test_chatml_stops_on_im_end():
    tok = chatml_tokenizer()
    assert stop_token_ids("chatml_direct", tok) == [tok.convert_tokens_to_ids("<|im_end|>")]
    assert stop_token_ids("vicuna_v1", tok) == []


def test_cut_at_stop_ends_the_reply_at_the_first_stop():
    assert cut_at_stop("a red square\nUSER: more", ["\n"]) == "a red square"
    assert cut_at_stop("yes<|im_end|>no\n", ["\n", "<|im_end|>"]) == "yes"
    assert cut_at_stop("no stop here", []) == "no stop here"


def test_generation_ends_at_a_template_stop_id():
    tok = load_tokenizer("tiny")
    model = build_model(type("M", (), {"lm": "tiny", "projector": "linear"})(), tok, 8).eval()
    prompt = tok("a red", add_special_tokens=False)["input_ids"]
    free = model.generate([prompt], [None], max_new_tokens=6)[0]
    stops = [*model.eos_token_ids, free[2]]  # pretend the third token is the template's stop token
    with torch.no_grad():
        cut = model.generate([prompt], [None], max_new_tokens=6, stop_token_ids=stops)[0]
    assert cut == free[: free.index(free[2])]
