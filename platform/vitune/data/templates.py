"""Conversation templates and label masks: the one definition of how turns become text, ids and labels.

(Over 400 lines on purpose: the segments and the masks built from them are one definition, read together.)

A template is data (``ConversationTemplate``: system prompt, role names, separator style, separators).
Every style renders a conversation as alternating *segments*: prompt text (never trained) and assistant
text (trained: the reply and the separator that ends it). The same segments give

- ``render_conversation``: the training string, identical to LLaVA's ``get_prompt()`` after
  ``preprocess_multimodal`` (``plain``: LLaVA's ``preprocess_plain`` string),
- ``render_generation_prompt``: the conversation so far plus the assistant cue,
- ``tokenize_conversation``: ids + labels, built by tokenizing segment by segment (see below),
- ``tokenize_generation_prompt``: the serving-time ids, a prefix of the training ids by construction,
- ``stop_strings`` / ``stop_token_ids``: where generation ends for templates whose turn end is not the
  tokenizer's EOS (``plain``: its newline separator; ``chatml_direct``: ``<|im_end|>``), as LLaVA's eval
  scripts stop on ``conv.sep``.

``with_system`` gives a template with a caller's system prompt (serving's system messages), or a
``TemplateError`` when the template has none.

Masks are built by tokenizing each segment on its own (no special tokens added; ``<image>`` split out
and inserted as its single id, as LLaVA's ``tokenizer_image_token`` does), then concatenating, with BOS
prepended once when the tokenizer adds one. Trained labels are therefore exactly the tokens of the
trained text, for any tokenizer, with no per-tokenizer offset arithmetic. Segment boundaries sit where
byte-level BPE pre-tokenizers split anyway (the space between ``ASSISTANT:`` and the reply belongs to
the reply, so ids match tokenizing the whole string for ordinary text); for sentencepiece-style
tokenizers a segment may gain the tokenizer's dummy-prefix space, which is LLaVA's own behaviour for
its per-chunk tokenization. Serving tokenizes prompts through the same segments, so train and serve
see the same ids.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from vitune import GPT, HUMAN, IGNORE_INDEX, IMAGE_TOKEN
from vitune.data.records import Record, Turn, as_turns, describe_record, normalize_turn_image_token
from vitune.data.tokenizer import image_token_id

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class SepStyle(StrEnum):
    """How turns are joined (the styles of LLaVA's ``conversation.py`` we support, plus the tokenizer's own)."""

    PLAIN = "plain"  # stage-1 captioning: <image> + caption + sep
    TWO = "two"  # "SYSTEM USER: q ASSISTANT: a</s>USER: ..."
    LLAMA_2 = "llama_2"  # "[INST] <<SYS>>..<</SYS>>\n\nq [/INST] a </s><s>[INST] ..."
    MPT = "mpt"  # ChatML: "<|im_start|>user\nq<|im_end|><|im_start|>assistant\na<|im_end|>"
    CHAT_TEMPLATE = "chat_template"  # the tokenizer's apply_chat_template


@dataclass(frozen=True)
class ConversationTemplate:
    """A conversation format as data; ``roles`` are (user, assistant) as written in the prompt."""

    name: str
    style: SepStyle
    system: str = ""
    roles: tuple[str, str] = ("", "")
    sep: str = ""
    sep2: str = ""


class TemplateError(ValueError):
    """A conversation that the template cannot render (bad turn order, plain without image, ...)."""

    def __init__(self, problem: str, kind: str = "template_mismatch", message: str | None = None) -> None:
        self.problem = problem
        self.kind = kind
        super().__init__(message or problem)


class MaskError(TemplateError):
    """A sample whose labels cannot be built; the message names the record. Never a silent all -100 sample."""

    def __init__(self, problem: str, kind: str = "mask_error", record_id: str | None = None) -> None:
        self.record_id = record_id
        super().__init__(problem, kind, message=f"{describe_record(record_id)}: {problem}")


_VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
_LLAVA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
_LLAMA_2_SYSTEM = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being safe.  "
    "Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or illegal content. "
    "Please ensure that your responses are socially unbiased and positive in nature.\n\n"
    "If a question does not make any sense, or is not factually coherent, explain why instead of answering "
    "something not correct. If you don't know the answer to a question, please don't share false information."
)
_LLAVA_LLAMA_2_SYSTEM = (
    "You are a helpful language and vision assistant. "
    "You are able to understand the visual content that the user provides, "
    "and assist the user with a variety of tasks using natural language."
)
_CHATML_ROLES = ("<|im_start|>user\n", "<|im_start|>assistant\n")
_CHATML_SYSTEM = "<|im_start|>system\n"  # a ChatML system prompt is this cue + its text

TEMPLATES: Mapping[str, ConversationTemplate] = MappingProxyType(
    {
        t.name: t
        for t in (
            ConversationTemplate("plain", SepStyle.PLAIN, sep="\n"),
            ConversationTemplate("vicuna_v1", SepStyle.TWO, _VICUNA_SYSTEM, ("USER", "ASSISTANT"), " ", "</s>"),
            ConversationTemplate("llava_v1", SepStyle.TWO, _LLAVA_V1_SYSTEM, ("USER", "ASSISTANT"), " ", "</s>"),
            ConversationTemplate("llama_2", SepStyle.LLAMA_2, _LLAMA_2_SYSTEM, ("USER", "ASSISTANT"), "<s>", "</s>"),
            ConversationTemplate(
                "llava_llama_2", SepStyle.LLAMA_2, _LLAVA_LLAMA_2_SYSTEM, ("USER", "ASSISTANT"), "<s>", "</s>"
            ),
            ConversationTemplate(
                "chatml_direct", SepStyle.MPT, _CHATML_SYSTEM + "Answer the questions.", _CHATML_ROLES, "<|im_end|>"
            ),
            ConversationTemplate("chat_template", SepStyle.CHAT_TEMPLATE, roles=("user", "assistant")),
        )
    }
)


def get_template(name: str | ConversationTemplate) -> ConversationTemplate:
    """The template registered under ``name`` (a ``ConversationTemplate`` passes through)."""
    if isinstance(name, ConversationTemplate):
        return name
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ValueError(f"unknown conversation template {name!r}; valid: {', '.join(TEMPLATES)}") from None


def with_system(template: str | ConversationTemplate, system: str | None) -> ConversationTemplate:
    """``template`` with its system prompt replaced by ``system`` (None keeps the template's own).

    Raises ``TemplateError`` for templates that have no system prompt (``plain``, ``chat_template``).
    """
    tpl = get_template(template)
    if system is None:
        return tpl
    if tpl.style in (SepStyle.TWO, SepStyle.LLAMA_2):
        return replace(tpl, system=system)
    if tpl.style is SepStyle.MPT:
        return replace(tpl, system=_CHATML_SYSTEM + system)
    raise TemplateError(
        f"the {tpl.name!r} template has no system prompt; put the instruction in the user message", "no_system_prompt"
    )


@dataclass(frozen=True)
class Segment:
    """A piece of the rendered conversation; ``trained`` pieces are an assistant reply plus its end separator."""

    text: str
    trained: bool


def _check_turns(turns: Sequence[Turn], generation: bool) -> None:
    if not turns:
        raise TemplateError("conversation is empty", "missing_conversations")
    for i, t in enumerate(turns):
        expected = HUMAN if i % 2 == 0 else GPT
        if t.from_ != expected:
            raise TemplateError(f"turn {i} is from {t.from_!r}, expected {expected!r}", "roles_not_alternating")
    if generation and len(turns) % 2 == 0:
        raise TemplateError(
            "a generation prompt needs the conversation to end with a human turn", "roles_not_alternating"
        )
    if not generation and len(turns) % 2:
        raise TemplateError("a training conversation must end with a gpt turn", "roles_not_alternating")


def _plain_segments(turns: Sequence[Turn], tpl: ConversationTemplate, generation: bool) -> list[Segment]:
    # LLaVA's preprocess_plain: the human text is dropped, the image token alone is the prompt
    if len(turns) != (1 if generation else 2):
        raise TemplateError(f"the plain template takes one human + one gpt turn, got {len(turns)} turns")
    if IMAGE_TOKEN not in turns[0].value:
        raise TemplateError(f"the plain template needs {IMAGE_TOKEN} in the human turn (an image record)")
    segments = [Segment(IMAGE_TOKEN, False)]
    if not generation:
        segments.append(Segment(turns[1].value + tpl.sep, True))
    return segments


# TWO and MPT differ only in how a round is written: (the user's turn up to the assistant cue, the reply + end)
_ROUND_FORMATS = {
    SepStyle.TWO: ("{user}: {text}{sep}{assistant}:", " {text}{sep2}"),
    SepStyle.MPT: ("{user}{text}{sep}{assistant}", "{text}{sep}"),
}


def _round_segments(turns: Sequence[Turn], tpl: ConversationTemplate) -> list[Segment]:
    """Rounds of TWO (Vicuna/LLaVA-v1) and MPT (ChatML) templates: the system prompt opens the first round."""
    ask, reply = _ROUND_FORMATS[tpl.style]
    user, assistant = tpl.roles
    segments, prefix = [], tpl.system + tpl.sep
    for k in range(0, len(turns), 2):
        asked = ask.format(user=user, text=turns[k].value, sep=tpl.sep, assistant=assistant)
        segments.append(Segment(prefix + asked, False))
        prefix = ""
        if k + 1 < len(turns):
            segments.append(Segment(reply.format(text=turns[k + 1].value, sep=tpl.sep, sep2=tpl.sep2), True))
    return segments


def _llama_2_segments(turns: Sequence[Turn], tpl: ConversationTemplate) -> list[Segment]:
    # The system prompt is wrapped into the first [INST]; every later round starts with sep ("<s>").
    # LLaVA builds "<s>[INST] ..." for every round and then strips the leading sep of the first one.
    wrapped_system = f"<<SYS>>\n{tpl.system}\n<</SYS>>\n\n" if tpl.system else ""
    segments = []
    for k in range(0, len(turns), 2):
        message = (wrapped_system if k == 0 else "") + turns[k].value
        segments.append(Segment(f"{tpl.sep if k else ''}[INST] {message} [/INST]", False))
        if k + 1 < len(turns):
            segments.append(Segment(f" {turns[k + 1].value} {tpl.sep2}", True))
    return segments


def _special_token_strings(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    specials = set(tokenizer.all_special_tokens)
    specials.update(t.content for t in tokenizer.added_tokens_decoder.values() if t.special)
    specials.discard(IMAGE_TOKEN)
    return sorted(specials)


def _chat_template_segments(
    turns: Sequence[Turn], tpl: ConversationTemplate, tokenizer: PreTrainedTokenizerBase | None, generation: bool
) -> list[Segment]:
    """Find each assistant reply in the tokenizer's rendering by rendering the prompt before it.

    The trained span is the reply plus the text up to and including the first special token after it
    (the template's end-of-turn marker, e.g. ``</s>``, ``<|im_end|>``, ``<|eot_id|>``).
    """
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise TemplateError("the chat_template template needs a tokenizer that has a chat template")
    role_of = {HUMAN: tpl.roles[0], GPT: tpl.roles[1]}
    messages = [{"role": role_of[t.from_], "content": t.value} for t in turns]

    def render(msgs: list[dict[str, str]], add_generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt)

    full = render(messages, generation)
    specials = _special_token_strings(tokenizer)
    segments, pos = [], 0
    for i in range(1, len(messages), 2):
        prompt = render(messages[:i], True)
        reply = messages[i]["content"]
        if not full.startswith(prompt) or len(prompt) < pos:
            raise TemplateError(
                f"the chat template renders the conversation before reply {i} differently "
                "when more turns follow; cannot locate the reply"
            )
        if not full.startswith(reply, len(prompt)):
            raise TemplateError(f"the chat template does not emit reply {i} verbatim after the generation prompt")
        reply_end = len(prompt) + len(reply)
        turn_end = len(render(messages[: i + 1], False))
        tail = full[reply_end:turn_end]
        hits = [tail.find(s) + len(s) for s in specials if s in tail]
        if hits:
            end = reply_end + min(hits)
        elif tail.strip():
            end = reply_end + len(tail.rstrip())
        else:
            raise TemplateError("the chat template emits no end-of-turn marker after the assistant reply")
        segments += [Segment(full[pos : len(prompt)], False), Segment(full[len(prompt) : end], True)]
        pos = end
    if pos < len(full):
        segments.append(Segment(full[pos:], False))
    return [s for s in segments if s.text]


def build_segments(
    conversations: Sequence[Turn | Mapping[str, Any]],
    template: str | ConversationTemplate,
    tokenizer: PreTrainedTokenizerBase | None = None,
    *,
    generation: bool = False,
) -> list[Segment]:
    """The conversation as prompt / trained segments; ``generation`` ends it with the assistant cue instead.

    ``<image>`` is normalised first as LLaVA's ``preprocess_multimodal`` does (idempotent).
    """
    tpl = get_template(template)
    turns = [Turn(t.from_, normalize_turn_image_token(t.value), t.extra) for t in as_turns(conversations)]
    _check_turns(turns, generation)
    if tpl.style is SepStyle.PLAIN:
        segments = _plain_segments(turns, tpl, generation)
    elif tpl.style in _ROUND_FORMATS:
        segments = _round_segments(turns, tpl)
    elif tpl.style is SepStyle.LLAMA_2:
        segments = _llama_2_segments(turns, tpl)
    else:
        segments = _chat_template_segments(turns, tpl, tokenizer, generation)
    if any(s.trained and IMAGE_TOKEN in s.text for s in segments):
        raise TemplateError(f"{IMAGE_TOKEN} appears in an assistant reply", "image_token_count")
    return segments


def render_conversation(
    conversations: Sequence[Turn | Mapping[str, Any]],
    template: str | ConversationTemplate,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> str:
    """The full training string (what LLaVA's ``get_prompt()`` gives; BOS is not part of it)."""
    return "".join(s.text for s in build_segments(conversations, template, tokenizer))


def render_generation_prompt(
    conversations_so_far: Sequence[Turn | Mapping[str, Any]],
    template: str | ConversationTemplate,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> str:
    """The conversation (ending with a human turn) followed by the assistant cue, e.g. ``... ASSISTANT:``.

    For ``plain`` this is ``<image>``, the prompt the stage-1 model was trained on (LLaVA's get_prompt
    would keep the human text and add a newline the model never saw).
    """
    return "".join(s.text for s in build_segments(conversations_so_far, template, tokenizer, generation=True))


@dataclass(frozen=True)
class TokenizedSample:
    """Token ids and labels (``IGNORE_INDEX`` outside the trained spans) of one conversation."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool
    num_trained: int
    num_cut: int = 0  # tokens truncation removed


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
    # a chat template writes its own BOS text (as HF's apply_chat_template(tokenize=True) assumes)
    return [] if tpl.style is SepStyle.CHAT_TEMPLATE else bos_ids(tokenizer)


def tokenize_conversation(
    conversations: Sequence[Turn | Mapping[str, Any]],
    template: str | ConversationTemplate,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    *,
    record_id: str | None = None,
) -> TokenizedSample:
    """Ids and labels of a training conversation, truncated from the right to ``max_length``.

    Raises ``MaskError`` (naming ``record_id``) when the labels cannot be built: the conversation does
    not fit the template, a reply tokenizes to nothing, no trained token survives truncation, or
    truncation cuts the ``<image>`` token.
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
    except MaskError:
        raise
    except TemplateError as e:
        raise MaskError(f"{e.problem} (template {tpl.name!r})", e.kind, record_id) from e

    num_cut = max(len(input_ids) - max_length, 0)
    truncated = num_cut > 0
    if truncated:
        n_images = sum(s.text.count(IMAGE_TOKEN) for s in segments)
        input_ids, labels = input_ids[:max_length], labels[:max_length]
        if n_images and input_ids.count(_image_token_id(tokenizer)) < n_images:
            raise MaskError(
                f"truncation to {max_length} tokens cuts the {IMAGE_TOKEN} token", "image_truncated", record_id
            )
    num_trained = sum(label != IGNORE_INDEX for label in labels)
    if not num_trained:
        raise MaskError(f"no trained token survives truncation to {max_length} tokens", "no_trained_tokens", record_id)
    return TokenizedSample(input_ids=input_ids, labels=labels, truncated=truncated, num_trained=num_trained,
                           num_cut=num_cut)


def tokenize_record(
    record: Record, template: str | ConversationTemplate, tokenizer: PreTrainedTokenizerBase, max_length: int
) -> TokenizedSample:
    """``tokenize_conversation`` for a validated record; errors name the record's id."""
    return tokenize_conversation(record.conversations, template, tokenizer, max_length, record_id=record.id)


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


def stop_strings(template: str | ConversationTemplate) -> tuple[str, ...]:
    """Text that ends a reply besides the tokenizer's EOS: the turn end of ``plain`` and ChatML templates.

    LLaVA's eval scripts stop on ``conv.sep`` for these (``plain`` is trained on caption + ``"\\n"``; ChatML
    replies end with ``<|im_end|>``). The ``two`` / ``llama_2`` styles end with ``</s>``, which is the EOS the
    model's stop ids already hold; a chat template ends on the tokenizer's own end-of-turn token.
    """
    tpl = get_template(template)
    return (tpl.sep,) if tpl.style in (SepStyle.PLAIN, SepStyle.MPT) and tpl.sep else ()


def stop_token_ids(template: str | ConversationTemplate, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The ids of the template's stop strings that are one token when they follow text (``"\\n"``,
    ``<|im_end|>``); a stop string spread over several tokens is caught as text by the caller instead."""
    probe = "a"
    base = tokenizer(probe, add_special_tokens=False)["input_ids"]
    ids = []
    for text in stop_strings(template):
        full = tokenizer(probe + text, add_special_tokens=False)["input_ids"]
        tail = full[len(base):]
        if full[: len(base)] == base and len(tail) == 1:
            ids.append(int(tail[0]))
    return ids


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """``text`` up to the first stop string (as LLaVA's keyword stopping criteria end a reply there)."""
    cuts = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return text[: min(cuts)] if cuts else text
