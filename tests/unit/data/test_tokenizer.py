"""Tokenizer loading: the offline tiny tokenizer, the <image> id."""

from __future__ import annotations

import pytest


def test_tiny_tokenizer_offline():
    from vitune.data.tokenizer import image_token_id, load_tokenizer

    tok = load_tokenizer("tiny")
    ids = tok("<image>\nWhat color? red", add_special_tokens=False).input_ids
    assert ids[0] == image_token_id(tok)
    assert tok.decode(ids) == "<image>\nWhat color? red"
    assert tok.decode(tok("日本 ünïcode", add_special_tokens=False).input_ids) == "日本 ünïcode"


def test_image_token_id_of_a_tokenizer_without_it_is_a_clear_error():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from vitune.data.tokenizer import image_token_id

    bare = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, "<unk>")),
                                   unk_token="<unk>")
    with pytest.raises(ValueError, match="the tokenizer has no <image> token .load it with vitune.data.tokenizer"):
        image_token_id(bare)
