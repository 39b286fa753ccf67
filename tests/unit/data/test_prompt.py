"""The one prompt policy (`vitune.data.prompt`): training's generation-prompt ids, `<image>` placeholders checked
against the images (count, human turns only, none dropped by the template), and refusals that name the field."""

from __future__ import annotations

import pickle

import pytest

from vitune import IMAGE_TOKEN
from vitune.data.masks import tokenize_generation_prompt
from vitune.data.prompt import PromptRejected, generation_prompt, image_first
from vitune.data.tokenizer import image_token_id, load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny")


def human(text: str) -> dict[str, str]:
    return {"from": "human", "value": text}


def gpt(text: str) -> dict[str, str]:
    return {"from": "gpt", "value": text}


def rejected(*args, **kwargs) -> PromptRejected:
    with pytest.raises(PromptRejected) as info:
        generation_prompt(*args, **kwargs)
    return info.value


@pytest.mark.parametrize("template", ["vicuna_v1", "llava_v1", "llama_2", "chatml_direct", "plain", "chat_template"])
def test_the_ids_are_trainings_generation_prompt_with_one_placeholder_per_image(tokenizer, template):
    turns = [human(image_first("What is in the picture?", 1))]
    prompt = generation_prompt(turns, template, tokenizer, ["cat.png"])
    assert prompt.ids == tokenize_generation_prompt(turns, template, tokenizer)
    assert prompt.num_images == 1 and prompt.ids.count(image_token_id(tokenizer)) == 1


def test_a_system_prompt_replaces_the_templates_own(tokenizer):
    turns = [human("Hello?")]
    default = generation_prompt(turns, "vicuna_v1", tokenizer)
    brief = generation_prompt(turns, "vicuna_v1", tokenizer, system="Be brief.")
    assert brief.ids != default.ids and "Be brief." in tokenizer.decode(brief.ids)
    assert generation_prompt(turns, "vicuna_v1", tokenizer, system=None).ids == default.ids


def test_images_in_several_human_turns_are_counted_in_order(tokenizer):
    turns = [human(image_first("First?", 1)), gpt("A cat."), human(image_first("And this one?", 1))]
    prompt = generation_prompt(turns, "vicuna_v1", tokenizer, ["a.png", "b.png"])
    assert prompt.num_images == 2
    first, second = [i for i, tok in enumerate(prompt.ids) if tok == image_token_id(tokenizer)]
    # each placeholder sits in its own turn, in reading order: placeholder i is images[i]
    assert "First?" in tokenizer.decode(prompt.ids[first:second]) and "And this one?" in tokenizer.decode(
        prompt.ids[second:])


@pytest.mark.parametrize(("turns", "images", "says"), [
    ([human(image_first("Q?", 1))], [], "holds 1 image tokens but the request has no image"),
    ([human("Q?")], ["a.png"], "holds 0 image tokens but the request has an image"),
    ([human(image_first("Q?", 1))], ["a.png", "b.png"], "holds 1 image tokens but the request has 2 images"),
])
def test_placeholders_must_match_the_images_in_number(tokenizer, turns, images, says):
    err = rejected(turns, "vicuna_v1", tokenizer, images)
    assert err.field == "images" and says in str(err)


def test_an_assistant_turn_may_not_hold_an_image(tokenizer):
    turns = [human("Q?"), gpt(f"{IMAGE_TOKEN} look"), human("And?")]
    err = rejected(turns, "vicuna_v1", tokenizer, ["a.png"])
    assert err.field == "turns" and "turn 1 is an assistant turn" in err.reason


def test_a_template_that_drops_a_placeholder_is_refused_not_shifted(tokenizer):
    # plain (stage-1 captioning) renders one <image> whatever the turn holds, so images[1] would have no place
    err = rejected([human(image_first("Compare them.", 2))], "plain", tokenizer, ["a.png", "b.png"])
    assert err.field == "images" and "keeps 1 of the prompt's 2 image tokens" in err.reason


def test_two_placeholders_in_one_turn_are_both_kept(tokenizer):
    prompt = generation_prompt([human(image_first("Compare them.", 2))], "vicuna_v1", tokenizer, ["a.png", "b.png"])
    assert prompt.num_images == 2 and prompt.ids.count(image_token_id(tokenizer)) == 2


def test_a_conversation_the_template_cannot_render_names_its_field(tokenizer):
    err = rejected([human("Q?"), gpt("A.")], "vicuna_v1", tokenizer)
    assert err.field == "turns"
    assert err.reason.startswith("the messages do not fit this model's 'vicuna_v1' conversation template: ")
    err = rejected([human(image_first("Q?", 1))], "plain", tokenizer, ["a.png"], system="Be brief.")
    assert err.field == "system" and "has no system prompt" in err.reason
    err = rejected([human("Q?")], "plain", tokenizer)  # plain captions an image: text alone does not fit
    assert err.field == "turns" and "needs <image>" in err.reason


def test_prompt_rejected_keeps_its_fields_across_processes():
    err = pickle.loads(pickle.dumps(PromptRejected("too many", "images", "image_count")))
    assert (err.reason, err.field, err.code, str(err)) == ("too many", "images", "image_count", "too many")
    # one shape with the engine's errors (vitune.refusal), so admission hands it on field for field
    from vitune.refusal import Refusal
    from vitune.serve.errors import RequestRejected

    assert isinstance(err, Refusal) and isinstance(err, ValueError) and PromptRejected("no").field == "turns"
    passed = RequestRejected(err.message, err.field, err.code)
    assert (passed.message, passed.param, passed.code) == (err.message, err.field, err.code)


@pytest.mark.parametrize(("text", "count", "expected"), [
    ("What is it?", 1, "<image>\nWhat is it?"),
    ("  What is it?  ", 1, "<image>\nWhat is it?"),
    ("", 1, "<image>"),
    ("Look <image> here", 1, "<image>\nLook  here"),
    ("Compare.", 2, "<image>\n<image>\nCompare."),
    ("  no image  ", 0, "  no image  "),
])
def test_image_first_puts_the_placeholders_in_front_on_their_own_lines(text, count, expected):
    assert image_first(text, count) == expected
