"""Token ids and label masks of a conversation, tokenized segment by segment from its template's rendering.

``tokenize_conversation`` / ``tokenize_record`` give a training sample (ids + labels); ``tokenize_generation_prompt``
gives the serving-time ids through the same encoder, so they are a prefix of the training ids by construction.

Masks are built by tokenizing each segment of ``vitune.data.templates.build_segments`` on its own (no special tokens
added; ``<image>`` split out and inserted as its single id, as LLaVA's ``tokenizer_image_token`` does), then
concatenating, with BOS prepended once when the tokenizer adds one (and for templates with ``unmasked_tokens``,
LLaVA-NeXT's Qwen / Llama 3 ones, those tokens trained wherever they occur). Trained labels are therefore exactly
the tokens of the trained text, for any tokenizer, with no per-tokenizer offset arithmetic. Segment boundaries sit
where byte-level BPE pre-tokenizers split anyway (the space between ``ASSISTANT:`` and the reply belongs to the
reply, so ids match tokenizing the whole string for ordinary text); for sentencepiece-style tokenizers a segment may
gain the tokenizer's dummy-prefix space, which is LLaVA's own behaviour for its per-chunk tokenization. Serving
tokenizes prompts through the same segments, so train and serve see the same ids.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vitune import IGNORE_INDEX, IMAGE_TOKEN
from vitune.data.records import Record, Turn, describe_record
from vitune.data.templates import ConversationTemplate, SepStyle, TemplateError, build_segments, get_template
from vitune.data.tokenizer import image_token_id

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class MaskError(TemplateError):
    """A sample whose labels cannot be built; the message names the record. Never a silent all -100 sample."""

    def __init__(self, problem: str, kind: str = "mask_error", record_id: str | None = None) -> None:
        self.record_id = record_id
        super().__init__(problem, kind, message=f"{describe_record(record_id)}: {problem}")


@dataclass(frozen=True)
class TokenizedSample:
    """Token ids and labels (``IGNORE_INDEX`` outside the trained spans) of one conversation."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool
    num_trained: int
    num_cut: int = 0  # tokens truncation removed
    visual_tokens: tuple[int, ...] = ()  # the positions each <image> expands to, in order (when they were given)

    @property
    def length(self) -> int:
        """Positions the LM sees: the token ids with each ``<image>`` expanded to its visual tokens."""
        return len(self.input_ids) + sum(self.visual_tokens) - len(self.visual_tokens)


def bos_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """``[bos]`` when the tokenizer prepends a BOS on its own (Llama), else ``[]`` (GPT-2, Qwen)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    return [bos] if probe and probe[0] == bos else []


def _image_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    try:
        return image_token_id(tokenizer)
    except ValueError as e:  # a counted, reported skip of the record, like every other mask problem
        raise TemplateError(str(e)) from e


def _encode(text: str, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids of one segment: no special tokens added, each ``<image>`` as its single id."""
    ids: list[int] = []
    for j, chunk in enumerate(text.split(IMAGE_TOKEN)):
        if j:
            ids.append(_image_token_id(tokenizer))
        if chunk:
            ids.extend(tokenizer(chunk, add_special_tokens=False)["input_ids"])
    return ids


def _prefix_ids(tpl: ConversationTemplate, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    # a chat template (and Llama 3's, which LLAMA_3 renders) writes its own BOS text, as HF's
    # apply_chat_template(tokenize=True) assumes
    return [] if tpl.style in (SepStyle.CHAT_TEMPLATE, SepStyle.LLAMA_3) else bos_ids(tokenizer)


def unmasked_token_ids(tpl: ConversationTemplate, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Ids of ``tpl.unmasked_tokens`` in this vocabulary (pieces it does not hold are left out, as
    ``convert_tokens_to_ids`` gives LLaVA-NeXT no id for them either)."""
    ids = set()
    for piece in tpl.unmasked_tokens:
        i = tokenizer.convert_tokens_to_ids(piece)
        if isinstance(i, int) and i != tokenizer.unk_token_id:
            ids.add(i)
    return ids


def tokenize_conversation(
    conversations: Sequence[Turn | Mapping[str, Any]],
    template: str | ConversationTemplate,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    *,
    record_id: str | None = None,
    visual_tokens: Sequence[int] | None = None,
) -> TokenizedSample:
    """Ids and labels of a training conversation, truncated from the right to ``max_length``.

    ``visual_tokens`` gives the positions each ``<image>`` expands to, in reading order (a count per image:
    ``vitune.vision_recipe.visual_tokens`` of its size for anyres, the fixed N for pad); ``max_length`` then
    limits the sequence after that expansion, as LLaVA's ``model_max_length`` does. Without it each ``<image>``
    counts as one position.

    Raises ``MaskError`` (naming ``record_id``) when the labels cannot be built: the conversation does
    not fit the template, a reply tokenizes to nothing, no trained token survives truncation, truncation
    cuts an ``<image>`` token (or the images alone fill ``max_length``), or ``visual_tokens`` does not hold
    one count per ``<image>``.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be positive, got {max_length}")
    tpl = get_template(template)
    try:
        segments = build_segments(conversations, tpl, tokenizer)
        input_ids = _prefix_ids(tpl, tokenizer)
        labels = [IGNORE_INDEX] * len(input_ids)
        for seg in segments:
            ids = _encode(seg.text, tokenizer)
            if seg.trained and not ids:
                raise TemplateError(f"assistant text {seg.text!r} tokenizes to no tokens", "empty_reply")
            input_ids += ids
            labels += ids if seg.trained else [IGNORE_INDEX] * len(ids)
        unmasked = unmasked_token_ids(tpl, tokenizer)
        labels = [i if i in unmasked else label for i, label in zip(input_ids, labels, strict=True)]
    except MaskError:
        raise
    except TemplateError as e:
        raise MaskError(f"{e.problem} (template {tpl.name!r})", e.kind, record_id) from e

    n_images = sum(s.text.count(IMAGE_TOKEN) for s in segments)
    counts = tuple(int(n) for n in visual_tokens) if visual_tokens is not None else ()
    if visual_tokens is not None and len(counts) != n_images:
        raise MaskError(f"{len(counts)} visual-token counts given for {n_images} {IMAGE_TOKEN} tokens",
                        "image_token_count", record_id)
    # every image must survive truncation, so the token ids may take what their expansion leaves
    id_limit = max_length - (sum(counts) - len(counts))
    if n_images and id_limit < n_images + 1:  # not even the <image> tokens and one trained token fit
        raise MaskError(f"its {n_images} image(s) take {sum(counts)} visual tokens, which leave no room in "
                        f"max_length {max_length}", "image_truncated", record_id)
    num_cut = max(len(input_ids) - id_limit, 0)
    truncated = num_cut > 0
    after = f"{max_length} positions ({sum(counts)} of them visual tokens)" if counts else f"{max_length} tokens"
    if truncated:
        input_ids, labels = input_ids[:id_limit], labels[:id_limit]
        if n_images and input_ids.count(_image_token_id(tokenizer)) < n_images:
            which = "the" if n_images == 1 else "an"
            raise MaskError(f"truncation to {after} cuts {which} {IMAGE_TOKEN} token", "image_truncated", record_id)
    num_trained = sum(label != IGNORE_INDEX for label in labels)
    if not num_trained:
        raise MaskError(f"no trained token survives truncation to {after}", "no_trained_tokens", record_id)
    return TokenizedSample(input_ids=input_ids, labels=labels, truncated=truncated, num_trained=num_trained,
                           num_cut=num_cut, visual_tokens=counts)


def tokenize_record(
    record: Record, template: str | ConversationTemplate, tokenizer: PreTrainedTokenizerBase, max_length: int,
    visual_tokens: Sequence[int] | None = None,
) -> TokenizedSample:
    """``tokenize_conversation`` for a validated record (``visual_tokens``: a count per image of ``record.images``,
    in order); errors name the record's id."""
    return tokenize_conversation(record.conversations, template, tokenizer, max_length, record_id=record.id,
                                 visual_tokens=visual_tokens)


def tokenize_generation_prompt(
    conversations_so_far: Sequence[Turn | Mapping[str, Any]],
    template: str | ConversationTemplate,
    tokenizer: PreTrainedTokenizerBase,
) -> list[int]:
    """Serving-time prompt ids: the same segments as training, so they equal the training ids' prefix."""
    tpl = get_template(template)
    segments = build_segments(conversations_so_far, tpl, tokenizer, generation=True)
    ids = _prefix_ids(tpl, tokenizer)
    for seg in segments:
        ids += _encode(seg.text, tokenizer)
    return ids
