"""Tokenizers: the tiny offline byte-level BPEs shipped with the package, or any Hugging Face tokenizer.

Two tiny tokenizers, both trained on the synthetic corpus plus the conversation templates' fixed text, so the
demo and tests need no download: ``tiny`` (Llama-like: ``<s>`` BOS prepended, ``</s>`` EOS, ``<pad>``) and
``tiny-qwen2`` (Qwen2-like: no BOS, ``<|endoftext|>`` as pad and EOS, ``<|im_start|>`` / ``<|im_end|>``
special). ``python -m vitune.data.tokenizer`` rebuilds the shipped files.
``image_token_id`` is the one lookup of ``<image>``'s id (templates, the model and serving call it).
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from vitune import IMAGE_TOKEN

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# transformers is imported where a tokenizer is built: vitune.model imports image_token_id from here and must
# stay importable without transformers (a Serve or Ray process pays for it only when it loads a model).

log = logging.getLogger(__name__)

TINY_DIR = Path(__file__).parent.parent / "assets" / "tiny_tokenizer"
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN]
TINY_VOCAB_SIZE = 1024
TINY_QWEN2 = "tiny-qwen2"
TINY_QWEN2_DIR = Path(__file__).parent.parent / "assets" / "tiny_qwen2_tokenizer"
# Qwen2's tokenizer: <|endoftext|> is its pad and (base-model) EOS; the ChatML markers are special tokens
QWEN2_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", IMAGE_TOKEN]
# Qwen2-Instruct's chat template, in short (system default as Qwen2's), so `chat_template` runs offline too
TINY_QWEN2_CHAT_TEMPLATE = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# A chat template for the `chat_template` conversation template, so it runs offline with the tiny LM.
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}<|system|>\n{{ m['content'] }}\n"
    "{% elif m['role'] == 'user' %}<|user|>\n{{ m['content'] }}\n"
    "{% else %}<|assistant|>\n{{ m['content'] }}{{ eos_token }}\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_GENERAL_TEXT = """
A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful,
detailed, and polite answers to the user's questions. A chat between a curious human and an artificial
intelligence assistant. The assistant gives helpful, detailed, and polite answers to the human's questions.
USER: ASSISTANT: [INST] [/INST] <<SYS>> <</SYS>> <|im_start|>system <|im_start|>user <|im_start|>assistant
<|im_end|> <|system|> <|user|> <|assistant|> Answer the question using a single word or phrase.
Answer with the option's letter from the given choices directly. The answer is A. B. C. D. E.
What is in the image? Describe the picture. Please explain. Why is this unusual? What color is it?
How many objects are there? Where is the object? left right top bottom center middle corner
the a an of to in on at is are was were be this that these those there here with and or but not
person people man woman child dog cat car bus train bicycle table chair cup bottle plate food
question answer context options image picture photo scene background foreground object objects
zero one two three four five six seven eight nine ten 0 1 2 3 4 5 6 7 8 9 10 100 1000
, . ? ! : ; ' " ( ) [ ] { } - _ / \\ + = * & % $ # @ ~ ` < > |
"""


def _corpus() -> list[str]:
    from vitune.data import synthetic  # deferred: only rebuilding the shipped tokenizer needs the corpus

    return synthetic.corpus_texts() + [line for line in _GENERAL_TEXT.splitlines() if line.strip()]


def _train_bpe(special_tokens: list[str], vocab_size: int) -> Any:
    """The tiny byte-level BPE over the corpus (deterministic), with ``special_tokens`` first in the vocab."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # rebuilding only

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus() * 3, trainer=trainer)
    return tok


def build_tiny_tokenizer(out_dir: Path = TINY_DIR, vocab_size: int = TINY_VOCAB_SIZE) -> Path:
    """Train the tiny byte-level BPE (deterministic) and save it as ``tokenizer.json`` in ``out_dir``."""
    from tokenizers import processors  # rebuilding only

    tok = _train_bpe(SPECIAL_TOKENS, vocab_size)
    bos = tok.token_to_id("<s>")
    # like Llama: a BOS is prepended when special tokens are added
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bos)])
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    return out_dir


def build_tiny_qwen2_tokenizer(out_dir: Path = TINY_QWEN2_DIR, vocab_size: int = TINY_VOCAB_SIZE) -> Path:
    """Train the tiny Qwen2-like byte-level BPE (deterministic; no BOS, as Qwen2) into ``out_dir``."""
    tok = _train_bpe(QWEN2_SPECIAL_TOKENS, vocab_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    return out_dir


def _load_tiny() -> PreTrainedTokenizerBase:
    from transformers import PreTrainedTokenizerFast  # deferred: slow to import

    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(TINY_DIR / "tokenizer.json"),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens=[IMAGE_TOKEN],
        model_max_length=4096,
        padding_side="right",
    )
    tok.chat_template = TINY_CHAT_TEMPLATE
    return tok


def _load_tiny_qwen2() -> PreTrainedTokenizerBase:
    from transformers import PreTrainedTokenizerFast  # deferred: slow to import

    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(TINY_QWEN2_DIR / "tokenizer.json"),
        bos_token=None,
        eos_token="<|endoftext|>",
        unk_token=None,
        pad_token="<|endoftext|>",
        extra_special_tokens=["<|im_start|>", "<|im_end|>", IMAGE_TOKEN],
        model_max_length=4096,
        padding_side="right",
    )
    tok.chat_template = TINY_QWEN2_CHAT_TEMPLATE
    return tok


# The offline tokenizers by name (vitune.model.vlm's tiny LMs name theirs here)
TINY_TOKENIZERS = MappingProxyType({"tiny": _load_tiny, TINY_QWEN2: _load_tiny_qwen2})


def load_tokenizer(name_or_path: str = "tiny") -> PreTrainedTokenizerBase:
    """A ``TINY_TOKENIZERS`` name → that shipped offline tokenizer; anything else → ``AutoTokenizer`` (local or
    hub path). The result always has ``<image>`` as a special token and a pad token.
    """
    if name_or_path in TINY_TOKENIZERS:
        tok = TINY_TOKENIZERS[name_or_path]()
    else:
        # deferred: transformers is slow to import and not every caller needs it
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(name_or_path)
    if IMAGE_TOKEN not in tok.get_vocab():
        tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if tok.pad_token is None:
        # Vicuna/Llama have no pad token; LLaVA pads with unk
        tok.pad_token = tok.unk_token or tok.eos_token
    return tok


def image_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id of ``<image>`` in ``tokenizer``; a ``ValueError`` when it has none (a tokenizer not loaded here)."""
    token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ValueError(f"the tokenizer has no {IMAGE_TOKEN} token "
                         "(load it with vitune.data.tokenizer.load_tokenizer)")
    return int(token_id)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    log.info("wrote %s", build_tiny_tokenizer())
    log.info("wrote %s", build_tiny_qwen2_tokenizer())
