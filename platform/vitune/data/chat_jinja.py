"""vitune's conversation templates as Jinja chat templates, for transformers, vLLM and SGLang.

`chat_template_jinja(template, tokenizer)` renders OpenAI-style messages to exactly the text vitune builds
for them: `render_generation_prompt` with `add_generation_prompt=True` (a conversation ending with a user
turn), `render_conversation` for one ending with an assistant turn, each preceded by the BOS text where
vitune prepends the BOS id. So every engine that applies the exported template feeds the model the
tokens it was trained on.

Messages become turns as vitune's serving makes them (`vitune.serve.request`, and `with_system` for the
system prompt): system (or developer) messages open the conversation and replace the template's system prompt;
then user and assistant alternate, starting with user; a message's text parts are joined with a newline;
the image puts `<image>` in front of its turn on its own line (LLaVA's `preprocess_multimodal`, as in
`normalize_turn_image_token`). Content may be a string (vLLM's "string" format, with `<image>`
placeholders) or a list of parts (`text`, `image`, `image_url`). What vitune refuses, the template
refuses through `raise_exception`.
"""

from __future__ import annotations

from typing import Any

from vitune import IMAGE_TOKEN
from vitune.data.masks import bos_ids
from vitune.data.templates import LLAMA_3_BOS_TEXT, ConversationTemplate, SepStyle, get_template, with_system

_PREAMBLE = """\
{%- set ns = namespace(system=none, turns=[], images=0) -%}
{%- for message in messages -%}
  {%- if message['content'] is string -%}
    {%- set text = message['content'] -%}
  {%- else -%}
    {%- set part = namespace(texts=[], prefix='') -%}
    {%- for p in message['content'] -%}
      {%- if p['type'] == 'text' -%}
        {%- set part.texts = part.texts + [p['text']] -%}
      {%- elif p['type'] in ['image', 'image_url'] -%}
        {%- set part.prefix = part.prefix + IMG + '\\n' -%}
      {%- endif -%}
    {%- endfor -%}
    {%- set text = part.prefix + (part.texts | join('\\n')) -%}
  {%- endif -%}
  {%- if IMG in text -%}
    {%- set ns.images = ns.images + (text.split(IMG) | length) - 1 -%}
    {%- set text = (IMG + '\\n' + (text | replace(IMG, '') | trim)) | trim -%}
  {%- endif -%}
  {%- if message['role'] in ['system', 'developer'] -%}
    {%- if ns.turns -%}{{ raise_exception('system messages must come before the first user message') }}{%- endif -%}
    {%- if IMG in text -%}{{ raise_exception('images go in user messages, not system messages') }}{%- endif -%}
    {%- set ns.system = text if ns.system is none else ns.system + '\\n' + text -%}
  {%- else -%}
    {%- if message['role'] != ['user', 'assistant'][ns.turns | length % 2] -%}
      {{ raise_exception('after any system messages, user and assistant messages alternate, starting with user') }}
    {%- endif -%}
    {%- if message['role'] == 'assistant' and IMG in text -%}
      {{ raise_exception('images go in user messages, not assistant messages') }}
    {%- endif -%}
    {%- set ns.turns = ns.turns + [text] -%}
  {%- endif -%}
{%- endfor -%}
{%- if ns.images > 1 -%}{{ raise_exception('this model takes at most one image per conversation') }}{%- endif -%}
{%- if not ns.turns -%}{{ raise_exception('the messages hold no user message') }}{%- endif -%}
"""

_NO_SYSTEM = """\
{%- if ns.system is not none -%}
  {{ raise_exception('this model has no system prompt; put the instruction in the user message') }}
{%- endif -%}
"""

_TWO = """\
{%- set system = SYSTEM if ns.system is none else ns.system -%}
{%- for t in ns.turns -%}
  {%- if loop.index0 % 2 == 0 -%}
    {{- (system + SEP if loop.first else '') + USER + ': ' + t + SEP -}}
    {%- if not loop.last or add_generation_prompt -%}{{- ASSISTANT + ':' -}}{%- endif -%}
  {%- else -%}
    {{- ' ' + t + SEP2 -}}
  {%- endif -%}
{%- endfor -%}
"""

_LLAMA_2 = """\
{%- set system = SYSTEM if ns.system is none else ns.system -%}
{%- for t in ns.turns -%}
  {%- if loop.index0 % 2 == 0 -%}
    {%- set wrapped = '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' if loop.first and system else '' -%}
    {{- ('' if loop.first else SEP) + '[INST] ' + wrapped + t + ' [/INST]' -}}
  {%- else -%}
    {{- ' ' + t + ' ' + SEP2 -}}
  {%- endif -%}
{%- endfor -%}
"""

_MPT = """\
{%- set system = SYSTEM if ns.system is none else MPT_SYSTEM + ns.system -%}
{%- for t in ns.turns -%}
  {%- if loop.index0 % 2 == 0 -%}
    {{- (system + SEP if loop.first else '') + USER + t + SEP -}}
    {%- if not loop.last or add_generation_prompt -%}{{- ASSISTANT -}}{%- endif -%}
  {%- else -%}
    {{- t + SEP -}}
  {%- endif -%}
{%- endfor -%}
"""

# LLaVA-NeXT's Qwen ChatML: a newline after every <|im_end|>, the roles without theirs
_CHATML = """\
{%- set system = SYSTEM if ns.system is none else MPT_SYSTEM + ns.system -%}
{%- if system -%}{{- system + SEP + '\\n' -}}{%- endif -%}
{%- for t in ns.turns -%}
  {{- [USER, ASSISTANT][loop.index0 % 2] + '\\n' + t + SEP + '\\n' -}}
  {%- if loop.last and loop.index0 % 2 == 0 and add_generation_prompt -%}{{- ASSISTANT + '\\n' -}}{%- endif -%}
{%- endfor -%}
"""

# Meta's Llama 3 template as LLaVA-NeXT applies it: the system message always, every content trimmed
_LLAMA_3 = """\
{%- set system = SYSTEM if ns.system is none else ns.system -%}
{{- BOS_TEXT + '<|start_header_id|>system<|end_header_id|>\\n\\n' + (system | trim) + SEP -}}
{%- for t in ns.turns -%}
  {{- '<|start_header_id|>' + [USER, ASSISTANT][loop.index0 % 2] + '<|end_header_id|>\\n\\n' + (t | trim) + SEP -}}
  {%- if loop.last and loop.index0 % 2 == 0 and add_generation_prompt -%}
    {{- '<|start_header_id|>' + ASSISTANT + '<|end_header_id|>\\n\\n' -}}
  {%- endif -%}
{%- endfor -%}
"""

_PLAIN = """\
{%- if ns.turns | length > 2 -%}
  {{ raise_exception('the plain template takes one user and one assistant turn') }}
{%- endif -%}
{%- if IMG not in ns.turns[0] -%}
  {{ raise_exception('the plain template needs an image in the user turn') }}
{%- endif -%}
{{- IMG -}}
{%- if ns.turns | length > 1 -%}{{- ns.turns[1] + SEP -}}{%- endif -%}
"""

# The tokenizer's own template then renders string-content messages, as vitune's chat_template style does.
_CHAT_TEMPLATE = """\
{%- set conv = namespace(messages=[]) -%}
{%- for t in ns.turns -%}
  {%- set conv.messages = conv.messages + [{'role': [USER, ASSISTANT][loop.index0 % 2], 'content': t}] -%}
{%- endfor -%}
{%- set messages = conv.messages %}"""

_BODIES = {SepStyle.TWO: _TWO, SepStyle.LLAMA_2: _LLAMA_2, SepStyle.MPT: _MPT, SepStyle.CHATML: _CHATML,
           SepStyle.LLAMA_3: _LLAMA_3}


def _literal(text: str) -> str:
    """A Jinja string literal for `text` (Jinja unescapes literals like Python, non-ASCII included)."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    return f'"{escaped}"'


def _constants(tpl: ConversationTemplate) -> str:
    # what `with_system` writes in front of a caller's system text (ChatML's system cue)
    mpt_system = with_system(tpl, "").system if tpl.style in (SepStyle.MPT, SepStyle.CHATML) else ""
    values = {"IMG": IMAGE_TOKEN, "SYSTEM": tpl.system, "USER": tpl.roles[0], "ASSISTANT": tpl.roles[1],
              "SEP": tpl.sep, "SEP2": tpl.sep2, "MPT_SYSTEM": mpt_system, "BOS_TEXT": LLAMA_3_BOS_TEXT}
    return "".join(f"{{%- set {name} = {_literal(value)} -%}}\n" for name, value in values.items())


def chat_template_jinja(template: str | ConversationTemplate, tokenizer: Any) -> str:
    """The Jinja chat template that renders vitune's prompt for `template` with `tokenizer`.

    `tokenizer` decides whether the BOS text opens the prompt (vitune prepends the BOS id when the
    tokenizer adds one itself) and, for the `chat_template` style, supplies its own template.
    """
    tpl = get_template(template)
    head = _constants(tpl) + _PREAMBLE
    if tpl.style is SepStyle.CHAT_TEMPLATE:
        own = getattr(tokenizer, "chat_template", None)
        if not isinstance(own, str) or not own:
            raise ValueError(f"template {tpl.name!r} needs a tokenizer with a (single) chat template")
        return head + _NO_SYSTEM + _CHAT_TEMPLATE + own
    # LLAMA_3 writes "<|begin_of_text|>" as text itself, as vitune's rendering does
    bos = "{{- bos_token -}}\n" if bos_ids(tokenizer) and tpl.style is not SepStyle.LLAMA_3 else ""
    if tpl.style is SepStyle.PLAIN:
        return head + _NO_SYSTEM + bos + _PLAIN
    return head + bos + _BODIES[tpl.style]
