"""pre_caption / pre_question against the original's outputs (parity fixtures)."""
import json

import pytest

from conftest import PARITY
from data.utils import pre_caption, pre_question

FIXTURE = PARITY / "public" / "text_preprocessing" / "text_preprocessing.json"
CASES = json.loads(FIXTURE.read_text(encoding="utf-8"))


def _ids(entries):
    return [f"{i}:{e['input'][:30]!r}" for i, e in enumerate(entries)]


def test_fixture_has_every_section():
    for key in ("pre_caption", "pre_question", "pre_caption_default_max_words_50",
                "pre_question_default_max_ques_words_50"):
        assert len(CASES[key]) >= 20, key


@pytest.mark.parametrize("case", CASES["pre_caption"], ids=_ids(CASES["pre_caption"]))
def test_pre_caption_max_words_30(case):
    assert pre_caption(case["input"], max_words=case["max_words"]) == case["output"]


@pytest.mark.parametrize("case", CASES["pre_caption_default_max_words_50"],
                         ids=_ids(CASES["pre_caption_default_max_words_50"]))
def test_pre_caption_default_max_words(case):
    assert pre_caption(case["input"]) == case["output"]


@pytest.mark.parametrize("case", CASES["pre_question"], ids=_ids(CASES["pre_question"]))
def test_pre_question_max_words_30(case):
    assert pre_question(case["input"], max_ques_words=case["max_ques_words"]) == case["output"]


@pytest.mark.parametrize("case", CASES["pre_question_default_max_ques_words_50"],
                         ids=_ids(CASES["pre_question_default_max_ques_words_50"]))
def test_pre_question_default_max_words(case):
    assert pre_question(case["input"]) == case["output"]


def test_truncation_is_by_words():
    text = " ".join(f"w{i}" for i in range(60))
    assert pre_caption(text).split(" ") == [f"w{i}" for i in range(50)]
    assert pre_caption(text, 3) == "w0 w1 w2"
    assert pre_question(text + "?", 2) == "w0 w1"
