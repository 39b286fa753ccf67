"""MMBench option extraction by name: OpenCompass' 2023 rule (LLaVA-1.5's published numbers) and today's
VLMEvalKit rule, on answer strings of the kinds the official evaluators document, the spreadsheet round trip,
and the submission file read back as OpenCompass' 2023 evaluator reads it."""

from __future__ import annotations

import pytest

from tests.unit.evaluation import official_readers
from tests.unit.evaluation.test_mmbench_score import ANSWERS, ROWS, _write_tsv
from vitune import storage
from vitune.config import EvalJobConfig
from vitune.evaluation import mmbench, mmbench_rules

ANIMALS = {"A": "cat", "B": "dog", "C": "bird", "D": "fish"}
COLOURS = {"A": "red", "B": "green", "C": "blue", "D": "yellow"}


@pytest.mark.parametrize("text, options, in_2023, in_vlmevalkit", [
    ("A", ANIMALS, "A", "A"),
    (" B ", ANIMALS, "B", "B"),  # stray whitespace: both split on it
    ("b", ANIMALS, None, None),  # letters are upper case in both
    # an article, not option A: 2023 skips the letter when "A" is among more than three words and reads the
    # option text; VLMEvalKit takes a lone letter only among the last five words, and caps text matching
    ("A cat is lying on the mat", {"A": "dog", "B": "cat"}, "B", None),
    ("A dog", {"A": "dog", "B": "cat"}, "A", "A"),
    # several options named: 2023 takes a lone bare letter ("C") over a wrapped one ("B."); VLMEvalKit strips
    # the punctuation first, sees two letters and reads neither
    ("B. because C is wrong", ANIMALS, "C", None),
    ("(B) or (C)", ANIMALS, None, None),  # two letters in every form
    ("The answer is B.", ANIMALS, "B", "B"),  # 2023: the "X." wrapping; VLMEvalKit: a letter near the end
    ("(C) bird", ANIMALS, "C", "C"),
    ("E", {"A": "x", "B": "y"}, "E", None),  # 2023's letters run to E whatever the options
    ("Z", ANIMALS, None, "Z"),  # VLMEvalKit's "none of the options"
    ("Sorry, I can't help with images of people yet.", ANIMALS, None, "Z"),
    ("The correct answer is **C** because the sky looks that way in the picture today", COLOURS, None, "C"),
    ("the picture clearly shows a cat sitting", {"A": "cat", "B": "dog"}, "A", None),  # VLMEvalKit: too long
    ("a cat and a dog", {"A": "cat", "B": "dog"}, None, None),  # two option texts
    # an empty answer comes back from the spreadsheet as NaN, read as the string "nan"
    ("", {"A": "bread", "B": "nan"}, "B", "B"),
    ("None", {"A": "bread", "B": "nan"}, "B", "B"),
])
def test_both_rules_on_official_strings(text, options, in_2023, in_vlmevalkit):
    assert mmbench.extract_option(text, options, "opencompass_2023") == in_2023
    assert mmbench.extract_option(text, options, "vlmevalkit") == in_vlmevalkit


def test_the_default_is_the_rule_behind_the_published_numbers():
    assert mmbench_rules.DEFAULT_RULE == "opencompass_2023"
    assert EvalJobConfig().eval.mmbench_rule == "opencompass_2023"
    assert mmbench_rules.as_submitted("") == mmbench_rules.as_submitted("NA") == "nan"
    assert mmbench_rules.as_submitted(" A ") == " A "
    with pytest.raises(ValueError, match="valid: opencompass_2023, vlmevalkit"):
        mmbench_rules.get("gpt")


@pytest.mark.parametrize("rule", ["opencompass_2023", "vlmevalkit"])
def test_the_rule_is_recorded_and_the_submission_reads_back_the_same(tmp_path, rule):
    tsv = _write_tsv(tmp_path / mmbench.TSV_FILE)

    def answer(requests):
        return {r["id"]: ANSWERS[int(r["id"])] for r in requests if int(r["id"]) in ANSWERS}, None

    cfg = EvalJobConfig.model_validate({"eval": {"data": str(tmp_path), "mmbench_rule": rule}})
    out = tmp_path / "out"
    result = mmbench.run_mmbench(cfg, str(out), answer)["result"]
    assert result["rule"] == rule and f"the {rule} rule" in mmbench.markdown(result)
    xlsx = out / "official" / "mmbench_dev_20230712.xlsx"
    assert result["official_files"] == [str(xlsx)]
    rows = official_readers.read_xlsx(xlsx.read_bytes())
    # convert_mmbench_for_submission.py's columns: hint, category, source, image, comment, l2-category dropped,
    # prediction 7th
    assert list(rows[0]) == ["index", "question", "A", "B", "C", "D", "prediction", "answer", "split"]
    assert [r["index"] for r in rows] == [r["index"] for r in ROWS]
    by_index = {r["index"]: r for r in rows}
    assert by_index[1_000_000]["prediction"] == "D. red" and by_index[4]["prediction"] is None
    assert by_index[3]["C"] is None  # "None" in the TSV: NaN to pandas, an empty cell
    if rule == "opencompass_2023":  # the 2023 evaluator's reading of the file gives vitune's number
        meta = mmbench.read_tsv(tsv)
        assert official_readers.mmbench_2023(rows, meta) == pytest.approx(result["circular_accuracy"])
    assert storage.exists(str(xlsx))
