"""Conversation templates: the registry, rendering turns as prompt / trained segments, and where replies stop.

A template is data (``ConversationTemplate``: system prompt, role names, separator style, separators).
Every style renders a conversation as alternating *segments*: prompt text (never trained) and assistant
text (trained: the reply and the separator that ends it). The same segments give

- ``render_conversation``: the training string, identical to LLaVA's ``get_prompt()`` after
  ``preprocess_multimodal`` (``plain``: LLaVA's ``preprocess_plain`` string),
- ``render_generation_prompt``: the conversation so far plus the assistant cue,
- the token ids and label masks of ``vitune.data.masks``, built from these segments one by one,
- ``stop_strings`` / ``stop_token_ids``: where generation ends for templates whose turn end is not the
  tokenizer's EOS (``plain``: its newline separator; ChatML: ``<|im_end|>``; Llama 3: ``<|eot_id|>``), as
  LLaVA's eval scripts stop on ``conv.sep``.

The LLaVA-NeXT templates (``qwen_1_5`` / ``qwen_2``: ``CHATML``, ``llava_llama_3``: ``LLAMA_3``,
``mistral_instruct``: ``LLAMA_2`` without ``<s>``) render as its ``llava/conversation.py`` does
(``tests/unit/data/llava_next_rendered.json``), except that ``llava_llama_3``'s training string ends with
the last reply: its ``get_prompt()`` always appends the assistant header, which ``preprocess_llama3`` does not.
``chatml_direct`` trains each reply + ``<|im_end|>`` as ``preprocess_mpt`` does for tokenizers with a BOS (Yi);
with a BOS-less one (Qwen) that preprocessor's round lengths come out one short per later round and it drops
the whole multi-round sample ("tokenization mismatch"), which vitune does not copy.

``with_system`` gives a template with a caller's system prompt (serving's system messages), or a
``TemplateError`` when the template has none.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from vitune import GPT, HUMAN, IMAGE_TOKEN
from vitune.data.records import Turn, as_turns, normalize_turn_image_token

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class SepStyle(StrEnum):
    """How turns are joined (the styles of LLaVA's ``conversation.py`` we support, plus the tokenizer's own)."""

    PLAIN = "plain"  # stage-1 captioning: <image> + caption + sep
    TWO = "two"  # "SYSTEM USER: q ASSISTANT: a</s>USER: ..."
    LLAMA_2 = "llama_2"  # "[INST] <<SYS>>..<</SYS>>\n\nq [/INST] a </s><s>[INST] ..."
    MPT = "mpt"  # ChatML: "<|im_start|>user\nq<|im_end|><|im_start|>assistant\na<|im_end|>"
    CHATML = "chatml"  # LLaVA-NeXT's Qwen ChatML: "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\na<|im_end|>\n"
    LLAMA_3 = "llama_3"  # "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\ns<|eot_id|>..."
    CHAT_TEMPLATE = "chat_template"  # the tokenizer's apply_chat_template


@dataclass(frozen=True)
class ConversationTemplate:
    """A conversation format as data; ``roles`` are (user, assistant) as written in the prompt.

    ``unmasked_tokens``: vocabulary pieces (looked up with ``convert_tokens_to_ids``) whose ids are trained
    wherever they occur, also inside system and user turns, as LLaVA-NeXT's ``preprocess_qwen`` /
    ``preprocess_llama3`` do with their ``unmask_tokens_idx``.
    """

    name: str
    style: SepStyle
    system: str = ""
    roles: tuple[str, str] = ("", "")
    sep: str = ""
    sep2: str = ""
    unmasked_tokens: tuple[str, ...] = ()


class TemplateError(ValueError):
    """A conversation that the template cannot render (bad turn order, plain without image, ...)."""

    def __init__(self, problem: str, kind: str = "template_mismatch", message: str | None = None) -> None:
        self.problem = problem
        self.kind = kind
        super().__init__(message or problem)


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
_QWEN_SYSTEM = _CHATML_SYSTEM + "You are a helpful assistant."
# preprocess_qwen trains <|im_start|>, <|im_end|> and id 198 (Qwen's "\n" piece, "Ċ") everywhere; odd (the
# newline and header tokens of user turns are trained too), but it is what LLaVA-NeXT's Qwen models learnt.
_QWEN_UNMASKED = ("<|im_start|>", "<|im_end|>", "Ċ")
LLAMA_3_BOS_TEXT = "<|begin_of_text|>"
# preprocess_llama3's unmask list: its "\n\n" is looked up as a vocabulary piece, which byte-level Llama 3
# spells "ĊĊ", so it unmasks nothing there; we keep the lookup as written, so only the special tokens are trained.
_LLAMA_3_UNMASKED = (LLAMA_3_BOS_TEXT, "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "\n\n")

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
            ConversationTemplate("mistral_instruct", SepStyle.LLAMA_2, "", ("USER", "ASSISTANT"), "", "</s>"),
            *(
                ConversationTemplate(name, SepStyle.CHATML, _QWEN_SYSTEM, ("<|im_start|>user", "<|im_start|>assistant"),
                                     "<|im_end|>", unmasked_tokens=_QWEN_UNMASKED)
                for name in ("qwen_1_5", "qwen_2")
            ),
            ConversationTemplate("llava_llama_3", SepStyle.LLAMA_3, _LLAVA_LLAMA_2_SYSTEM, ("user", "assistant"),
                                 "<|eot_id|>", unmasked_tokens=_LLAMA_3_UNMASKED),
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
    if tpl.style in (SepStyle.TWO, SepStyle.LLAMA_2, SepStyle.LLAMA_3):
        return replace(tpl, system=system)
    if tpl.style in (SepStyle.MPT, SepStyle.CHATML):
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


def _header_segments(turns: Sequence[Turn], tpl: ConversationTemplate, generation: bool) -> list[Segment]:
    """CHATML (Qwen) and LLAMA_3 turns: a header per message, then its text and the turn end.

    LLaVA-NeXT's ``preprocess_qwen`` / ``preprocess_llama3`` train the whole assistant message, its header
    (``<|im_start|>assistant\\n``, ``<|start_header_id|>assistant<|end_header_id|>\\n\\n``) included, so the
    header is a trained segment of its own (kept apart from the reply, so the generation prompt, which ends
    with it, is a prefix of the training ids by construction).
    """
    if tpl.style is SepStyle.CHATML:
        def header(role: str) -> str:
            return role + "\n"
        end, opener = tpl.sep + "\n", ""
        system = tpl.system + end if tpl.system else ""  # conversation.py: no system block for an empty one
        def clean(text: str) -> str:
            return text
    else:  # LLAMA_3: Meta's chat template, which trims every content and always writes the system message
        def header(role: str) -> str:
            return f"<|start_header_id|>{role}<|end_header_id|>\n\n"
        end, opener = tpl.sep, LLAMA_3_BOS_TEXT
        def clean(text: str) -> str:
            return text.strip()
        system = header("system") + clean(tpl.system) + end
    user, assistant = tpl.roles
    segments, prefix = [], opener + system
    for k in range(0, len(turns), 2):
        segments.append(Segment(prefix + header(user) + clean(turns[k].value) + end, False))
        prefix = ""
        if k + 1 < len(turns):
            segments += [Segment(header(assistant), True), Segment(clean(turns[k + 1].value) + end, True)]
        elif generation:
            segments.append(Segment(header(assistant), False))
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
    elif tpl.style in (SepStyle.CHATML, SepStyle.LLAMA_3):
        segments = _header_segments(turns, tpl, generation)
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


def stop_strings(template: str | ConversationTemplate) -> tuple[str, ...]:
    """Text that ends a reply besides the tokenizer's EOS: the turn end of ``plain``, ChatML and Llama-3 templates.

    LLaVA's eval scripts stop on ``conv.sep`` for these (``plain`` is trained on caption + ``"\\n"``; ChatML
    replies end with ``<|im_end|>``, Llama 3's with ``<|eot_id|>``, LLaVA-NeXT's ``stop_token_ids=[128009]``).
    The ``two`` / ``llama_2`` styles end with ``</s>``, which is the EOS the model's stop ids already hold;
    a chat template ends on the tokenizer's own end-of-turn token.
    """
    tpl = get_template(template)
    stops_on_sep = (SepStyle.PLAIN, SepStyle.MPT, SepStyle.CHATML, SepStyle.LLAMA_3)
    return (tpl.sep,) if tpl.style in stops_on_sep and tpl.sep else ()


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
