"""Offline stand-ins for the tokenizers real LLaVA models use, trained in-process on the templates' own text.

- ``llama_tokenizer``: what transformers builds for Llama / Vicuna (``LlamaTokenizer``: BPE over
  sentencepiece-style ``▁`` pieces, byte fallback, Metaspace with the dummy-prefix space, BOS ``<s>`` added,
  EOS ``</s>``); ``legacy`` picks where the dummy prefix goes (``always``: after every special token too,
  as the slow sentencepiece tokenizer did; ``first``: only at the start of the text).
- ``chatml_tokenizer``: a Qwen-style byte-level BPE (``Qwen2Tokenizer``): no BOS, ``<|im_start|>`` and
  ``<|im_end|>`` special tokens.
- ``llama3_tokenizer``: a Llama-3-Instruct-style byte-level BPE: BOS ``<|begin_of_text|>`` added, the header /
  ``<|eot_id|>`` special tokens, no unk token, and Meta-Llama-3-8B-Instruct's chat template.

Both get ``<image>`` as a special token, as ``vitune.data.tokenizer.load_tokenizer`` does for any model.
Nothing is downloaded; the vocabularies are small (a few hundred pieces) but made of multi-character pieces.
"""

from __future__ import annotations

import json
import re

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast, Qwen2Tokenizer

from vitune import IMAGE_TOKEN
from vitune.data.templates import TEMPLATES, render_conversation

# Words the test conversations are drawn from; the corpus repeats them so they become whole pieces.
WORDS = (
    "a man irons clothes on the back of taxi yellow street city is it safe no not what unusual here "
    "describe picture photo dog cat sits table red blue two three people left right there are image shows"
).split()

_CORPUS_CONVERSATION = [
    {"from": "human", "value": f"{IMAGE_TOKEN}\nWhat is unusual here?"},
    {"from": "gpt", "value": "A man irons clothes on the back of a yellow taxi."},
    {"from": "human", "value": "Is it safe?"},
    {"from": "gpt", "value": "No, it is not safe."},
]


def _corpus() -> list[str]:
    texts = [render_conversation(_CORPUS_CONVERSATION, name) for name in TEMPLATES
             if name not in ("plain", "chat_template")]
    return texts * 4 + [" ".join(WORDS)] * 8


def _train(pre_tokenizer: pre_tokenizers.PreTokenizer, vocab_size: int, specials: list[str],
           **trainer_kwargs) -> tuple[dict[str, int], list[tuple[str, str]]]:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  **trainer_kwargs)
    tok.train_from_iterator(_corpus(), trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return dict(model["vocab"]), merges


def _with_image_token(tok: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return tok


def llama_tokenizer(legacy: bool) -> PreTrainedTokenizerBase:
    """A Llama / Vicuna-style tokenizer: ids 0-2 are ``<unk> <s> </s>``, then the 256 byte pieces, then BPE pieces.

    Trained with words split at ``▁`` (as sentencepiece trains with ``split_by_whitespace``), so no piece
    spans two words; applied, as ``LlamaTokenizer`` does, to the whole unsplit text.
    """
    specials = ["<unk>", "<s>", "</s>"]
    trained, merges = _train(pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
                             400, specials)
    vocab = {t: i for i, t in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)])}
    for piece in sorted(trained, key=trained.get):
        vocab.setdefault(piece, len(vocab))
    tok = LlamaTokenizer(vocab=vocab, merges=merges, legacy=legacy, add_prefix_space=True, add_bos_token=True)
    tok.pad_token = tok.unk_token  # LLaVA pads Vicuna with unk
    return _with_image_token(tok)


def chatml_tokenizer(image_token: bool = True) -> PreTrainedTokenizerBase:
    """A Qwen-style byte-level BPE with ChatML special tokens and no BOS (without ``<image>``: as an official
    LLaVA-NeXT / OneVision folder ships it, whose code splices images by the index -200 instead)."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trained, merges = _train(pre_tokenizers.ByteLevel(add_prefix_space=False), 600, specials,
                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok = Qwen2Tokenizer(vocab=trained, merges=merges, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                         additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    return _with_image_token(tok) if image_token else tok


# Meta-Llama-3-8B-Instruct's chat template (its tokenizer_config.json), which LLaVA-NeXT's llava_llama_3
# conversation renders through; the content is trimmed.
LLAMA_3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
LLAMA_3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def llama3_tokenizer() -> PreTrainedTokenizerBase:
    """A Llama-3-Instruct-style byte-level BPE: BOS added by the post-processor, EOS ``<|eot_id|>``, no unk."""
    trained, merges = _train(pre_tokenizers.ByteLevel(add_prefix_space=False), 600, LLAMA_3_SPECIALS,
                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab=trained, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    bos = trained["<|begin_of_text|>"]
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                       pair="<|begin_of_text|> $A <|begin_of_text|> $B",
                                                       special_tokens=[("<|begin_of_text|>", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                   additional_special_tokens=LLAMA_3_SPECIALS[1:])
    fast.chat_template = LLAMA_3_CHAT_TEMPLATE
    return _with_image_token(fast)


_BYTE_PIECE = re.compile(r"<0x([0-9A-F]{2})>")


def exact_text(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> str:
    """The text ``ids`` stand for, piece by piece with nothing stripped (``decode`` drops a leading space)."""
    pieces = tokenizer.convert_ids_to_tokens(ids)
    if not isinstance(tokenizer, LlamaTokenizer):  # byte-level pieces
        return "".join(p if p in tokenizer.all_special_tokens else tokenizer.convert_tokens_to_string([p])
                       for p in pieces)
    out = b""
    for piece in pieces:
        m = _BYTE_PIECE.fullmatch(piece)
        out += bytes([int(m.group(1), 16)]) if m else piece.replace("▁", " ").encode()
    return out.decode()
