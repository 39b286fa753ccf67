"""The one prompt policy: a conversation and the images that go with it → the generation prompt's token ids, checked.

Batch evaluation (`vitune.evaluation.inference.AnswerBatch`) and serving (`vitune.serve.engine.ServingEngine`)
both build their prompts here, so one conversation and image give the same ids in both (a test drives both
paths); the ids are training's by construction (`vitune.data.masks.tokenize_generation_prompt`, the
training segments ending with the assistant cue). Torch-free.

Images: the i-th `<image>` placeholder, in reading order over the turns, stands for `images[i]` (the splice
takes image features in that order). `generation_prompt` checks that the turns hold one placeholder per image,
only in human turns, and that the template kept every one of them in the ids; anything else is a
`PromptRejected` naming the field at fault (`turns`, `system` or `images`), never a silently shifted image.
The images themselves are opaque here (a URI, a decoded image): only how many there are matters.

Placement: `image_first` writes a human turn with its images' placeholders in front, each on its own line,
as LLaVA's eval scripts and `preprocess_multimodal` place them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vitune import GPT, IMAGE_TOKEN
from vitune.data.masks import tokenize_generation_prompt
from vitune.data.records import Turn, as_turns
from vitune.data.templates import ConversationTemplate, TemplateError, with_system
from vitune.data.tokenizer import image_token_id
from vitune.refusal import Refusal

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

class PromptRejected(Refusal, ValueError):
    """A conversation that cannot become a prompt with these images and this template.

    `reason` (the refusal's `message`) says why in words a client can act on; `field` names the part at fault
    (`turns`, `system` or `images`); `code` is a short machine-readable kind where one applies.
    """

    default_field = "turns"

    @property
    def reason(self) -> str:
        return self.message


@dataclass(frozen=True)
class Prompt:
    """A checked generation prompt: its token ids, in which each image is one placeholder id."""

    ids: list[int]
    num_images: int  # placeholder ids in `ids`; the i-th is replaced by images[i]'s visual tokens


def image_first(text: str, num_images: int) -> str:
    """A human turn's text with `num_images` placeholders in front, each on its own line (LLaVA's placement).

    Placeholders already in `text` are dropped first; text without images is returned unchanged.
    """
    if not num_images:
        return text
    rest = text.replace(IMAGE_TOKEN, "").strip()
    return "\n".join([IMAGE_TOKEN] * num_images + ([rest] if rest else []))


def _has(count: int) -> str:
    return {0: "has no image", 1: "has an image"}.get(count, f"has {count} images")


def _placeholders(turns: Sequence[Turn]) -> int:
    """How many `<image>` placeholders the turns hold; only human turns may hold any."""
    found = 0
    for i, turn in enumerate(turns):
        n = str(turn.value).count(IMAGE_TOKEN)
        if n and turn.from_ == GPT:
            raise PromptRejected(f"turn {i} is an assistant turn holding {IMAGE_TOKEN}; images go in human turns",
                                 "turns")
        found += n
    return found


def generation_prompt(
    turns: Sequence[Turn | Mapping[str, Any]],
    template: str | ConversationTemplate,
    tokenizer: PreTrainedTokenizerBase,
    images: Sequence[object] = (),
    *,
    system: str | None = None,
) -> Prompt:
    """The generation prompt of `turns` (LLaVA turns ending with the human turn to answer) for `images`.

    `system` replaces the template's system prompt (None keeps it). Raises `PromptRejected` when the
    placeholders do not match `images` or the conversation does not fit the template.
    """
    name = template.name if isinstance(template, ConversationTemplate) else template

    def does_not_fit(exc: TemplateError, field: str) -> PromptRejected:
        return PromptRejected(f"the messages do not fit this model's {name!r} conversation template: {exc}", field)

    try:
        tpl = with_system(template, system)
    except TemplateError as exc:
        raise does_not_fit(exc, "system") from None
    checked = as_turns(turns)
    found = _placeholders(checked)
    if found != len(images):
        raise PromptRejected(f"the prompt holds {found} image tokens but the request {_has(len(images))}", "images")
    try:
        ids = tokenize_generation_prompt(checked, tpl, tokenizer)
    except TemplateError as exc:
        raise does_not_fit(exc, "turns") from None
    kept = ids.count(image_token_id(tokenizer))
    if kept != len(images):  # a template that drops or merges placeholders would shift every later image
        raise PromptRejected(f"the {name!r} conversation template keeps {kept} of the prompt's {len(images)} "
                             "image tokens", "images")
    return Prompt(ids=ids, num_images=kept)
