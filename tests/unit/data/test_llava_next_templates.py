"""LLaVA-NeXT's templates (``qwen_1_5``, ``qwen_2``, ``llava_llama_3``, ``mistral_instruct``, ``chatml_direct``)
against LLaVA-NeXT itself.

- Rendering: ``llava_next_rendered.json`` holds what the official ``llava/conversation.py`` (the commit it
  names) renders for three conversations per template; vitune's strings must equal them byte for byte.
- Trained spans: LLaVA-NeXT's ``preprocess_qwen`` / ``preprocess_llama3`` tokenize the system message and
  then each message on its own (``apply_chat_template``), train the assistant messages whole (header
  included) and then also every id of their ``unmask_tokens`` list, wherever it is. ``llava_next_labels``
  below follows those steps with the offline stand-in tokenizers; vitune's ids and labels must equal them.
- Serving: the stop ids and the exported Jinja chat template (rendered by transformers) for the new templates.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.unit.data.real_tokenizers import chatml_tokenizer, exact_text, llama3_tokenizer
from vitune import IGNORE_INDEX, IMAGE_TOKEN
from vitune.data.chat_jinja import chat_template_jinja
from vitune.data.masks import tokenize_conversation, tokenize_generation_prompt
from vitune.data.templates import (
    TEMPLATES,
    SepStyle,
    render_conversation,
    render_generation_prompt,
    stop_strings,
    stop_token_ids,
    with_system,
)

FIXTURE = json.loads((Path(__file__).parent / "llava_next_rendered.json").read_text())
NEW = ("qwen_1_5", "qwen_2", "llava_llama_3", "mistral_instruct", "chatml_direct")
CASES = [(name, key) for name in NEW for key in FIXTURE["templates"][name]]
# conversation.py's LLAMA_3 get_prompt always ends with the assistant header (add_generation_prompt=True);
# the training string (preprocess_llama3) ends with the last reply's <|eot_id|>
LLAMA_3_CUE = "<|start_header_id|>assistant<|end_header_id|>\n\n"
# preprocess_qwen resets the tokenizer's chat template to this one before tokenizing each message
QWEN_PER_MESSAGE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                    "'<|im_end|>' + '\n'}}{% endfor %}")


def case(name: str, key: str) -> dict:
    return FIXTURE["templates"][name][key]


@pytest.fixture(scope="module")
def tokenizers():
    return {"chatml": chatml_tokenizer(), "llama3": llama3_tokenizer()}


def test_fixture_names_the_official_commit_and_every_case():
    assert len(FIXTURE["commit"]) == 40 and FIXTURE["commit"] in FIXTURE["source"]
    assert set(FIXTURE["templates"]) == set(NEW) <= set(TEMPLATES)
    assert all(set(convs) == {"one_turn_image", "two_rounds", "system"} for convs in FIXTURE["templates"].values())


@pytest.mark.parametrize(("name", "key"), CASES)
def test_renders_as_llava_next_conversation_py(name: str, key: str):
    c = case(name, key)
    tpl = with_system(name, c["system"])
    expected = c["get_prompt"].removesuffix(LLAMA_3_CUE) if name == "llava_llama_3" else c["get_prompt"]
    if name == "llava_llama_3":
        assert expected != c["get_prompt"]  # the one stated difference is really there
    assert render_conversation(c["turns"], tpl) == expected
    assert render_generation_prompt(c["turns"][:-1], tpl) == c["generation_prompt"]


def llava_next_labels(name: str, turns: list[dict], system: str, tok) -> tuple[list[int], list[int]]:
    """``preprocess_qwen`` / ``preprocess_llama3``'s ids and labels, step by step (not vitune's code path)."""
    messages = [{"role": "system", "content": system}]
    messages += [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]} for t in turns]
    ids: list[int] = []
    labels: list[int] = []
    for k, message in enumerate(messages):
        if name == "llava_llama_3":
            text = tok.apply_chat_template([message], tokenize=False)
            enc = tok(text, add_special_tokens=False)["input_ids"]
            enc = enc if k == 0 else enc[1:]  # every message after the system one drops its BOS
            unmask = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "\n\n"]
        else:
            text = tok.apply_chat_template([message], tokenize=False, chat_template=QWEN_PER_MESSAGE)
            enc = tok(text, add_special_tokens=False)["input_ids"]
            unmask = ["<|im_start|>", "<|im_end|>", "Ċ"]  # Ċ: the piece of Qwen's hard-coded id 198, "\n"
        ids += enc
        labels += enc if message["role"] == "assistant" else [IGNORE_INDEX] * len(enc)
    unmask_ids = {tok.convert_tokens_to_ids(p) for p in unmask} - {None, tok.unk_token_id}
    return ids, [i if i in unmask_ids else label for i, label in zip(ids, labels, strict=True)]


@pytest.mark.parametrize("name", ["qwen_1_5", "qwen_2", "llava_llama_3"])
@pytest.mark.parametrize("key", ["one_turn_image", "two_rounds", "system"])
def test_trained_labels_are_llava_nexts(name: str, key: str, tokenizers):
    tok = tokenizers["llama3" if name == "llava_llama_3" else "chatml"]
    c = case(name, key)
    tpl = with_system(name, c["system"])
    system = tpl.system.removeprefix("<|im_start|>system\n")
    ids, labels = llava_next_labels(name, c["turns"], system, tok)
    sample = tokenize_conversation(c["turns"], tpl, tok, max_length=4096)
    assert sample.input_ids == ids
    assert sample.labels == labels
    assert exact_text(tok, ids) == render_conversation(c["turns"], tpl)
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    assert labels[ids.index(image_id)] == IGNORE_INDEX


def test_qwen_trains_header_tokens_of_user_turns_too(tokenizers):
    """preprocess_qwen's odd part, kept: <|im_start|>, <|im_end|> and "\\n" are trained in system and user turns."""
    tok = tokenizers["chatml"]
    c = case("qwen_2", "two_rounds")
    sample = tokenize_conversation(c["turns"], "qwen_2", tok, max_length=4096)
    first_reply = sample.input_ids.index(tok.convert_tokens_to_ids("assistant"))
    before = [i for i, label in zip(sample.input_ids[:first_reply], sample.labels[:first_reply], strict=True)
              if label != IGNORE_INDEX]
    assert tok.convert_tokens_to_ids("<|im_start|>") in before and tok.convert_tokens_to_ids("<|im_end|>") in before
    assert tok.convert_tokens_to_ids("Ċ") in before
    words = tok("Describe the picture.", add_special_tokens=False)["input_ids"]
    assert all(sample.labels[sample.input_ids.index(w)] == IGNORE_INDEX for w in words)


def test_llama3_trains_whole_assistant_messages_and_the_special_tokens(tokenizers):
    tok = tokenizers["llama3"]
    c = case("llava_llama_3", "two_rounds")
    sample = tokenize_conversation(c["turns"], "llava_llama_3", tok, max_length=4096)
    trained = exact_text(tok, [i for i, label in zip(sample.input_ids, sample.labels, strict=True)
                               if label != IGNORE_INDEX])
    header = "<|start_header_id|>assistant<|end_header_id|>\n\n"
    assert trained == ("<|begin_of_text|><|start_header_id|><|end_header_id|><|eot_id|>"  # system message
                       "<|start_header_id|><|end_header_id|><|eot_id|>"  # user turn: no "\n\n" (see templates)
                       f"{header}Two dogs sit at a red table.<|eot_id|>"
                       "<|start_header_id|><|end_header_id|><|eot_id|>"
                       f"{header}No, it is not safe.<|eot_id|>")
    assert sample.input_ids.count(tok.bos_token_id) == 1 and sample.input_ids[0] == tok.bos_token_id


@pytest.mark.parametrize(("name", "kind"), [("qwen_2", "chatml"), ("llava_llama_3", "llama3")])
def test_generation_prompt_is_the_training_prefix_before_each_reply(name: str, kind: str, tokenizers):
    tok = tokenizers[kind]
    turns = case(name, "two_rounds")["turns"]
    sample = tokenize_conversation(turns, name, tok, max_length=4096)
    for k in (1, 3):
        prompt = tokenize_generation_prompt(turns[:k], name, tok)
        assert sample.input_ids[: len(prompt)] == prompt
        reply = tok(turns[k]["value"], add_special_tokens=False)["input_ids"]
        assert sample.input_ids[len(prompt) : len(prompt) + len(reply)] == reply


@pytest.mark.parametrize(("name", "kind", "stop"), [("qwen_1_5", "chatml", "<|im_end|>"),
                                                    ("qwen_2", "chatml", "<|im_end|>"),
                                                    ("llava_llama_3", "llama3", "<|eot_id|>")])
def test_replies_stop_on_the_turn_end(name: str, kind: str, stop: str, tokenizers):
    tok = tokenizers[kind]
    assert stop_strings(name) == (stop,)
    assert stop_token_ids(name, tok) == [tok.convert_tokens_to_ids(stop)]


def test_mistral_instruct_stops_on_eos_only():
    assert stop_strings("mistral_instruct") == ()  # its turn end is </s>, the model's EOS


def messages_of(turns: list[dict], system: str | None) -> list[dict]:
    out = [{"role": "system", "content": system}] if system is not None else []
    return out + [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]} for t in turns]


@pytest.mark.parametrize(("name", "key"), CASES)
def test_exported_jinja_renders_vitunes_prompt(name: str, key: str, tokenizers):
    tok = tokenizers["llama3" if name == "llava_llama_3" else "chatml"]
    jinja = chat_template_jinja(name, tok)
    c = case(name, key)
    tpl = with_system(name, c["system"])
    full = tok.apply_chat_template(messages_of(c["turns"], c["system"]), tokenize=False, chat_template=jinja)
    gen = tok.apply_chat_template(messages_of(c["turns"][:-1], c["system"]), tokenize=False,
                                  add_generation_prompt=True, chat_template=jinja)
    assert full == render_conversation(c["turns"], tpl)
    assert gen == render_generation_prompt(c["turns"][:-1], tpl) == c["generation_prompt"]
    if get_style(name) is SepStyle.LLAMA_3:
        assert full.count("<|begin_of_text|>") == 1


def get_style(name: str) -> SepStyle:
    return TEMPLATES[name].style
