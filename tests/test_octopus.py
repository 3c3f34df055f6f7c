"""The self-correction format (arXiv 2602.08503, Sec. 3) and the Config presets."""

import re

import pytest

from octopus import (
    BASELINE_SUFFIX,
    OCTOPUS_SUFFIX,
    PRESETS,
    SC,
    preset,
    sc_span,
    split_response,
    split_rounds,
)


def test_sc_is_the_empty_tag_pair_the_suffix_asks_for():
    asked = re.search(r"generate (<self-correction>.*?</self-correction>) tags", OCTOPUS_SUFFIX)
    assert asked and re.sub(r"\s", "", SC) == re.sub(r"\s", "", asked.group(1))
    assert OCTOPUS_SUFFIX.endswith("All reasoning, answer steps must be included without omission.")
    # SC is the pair between blank lines, and the blank lines belong to it: o1 and o2 end and
    # start at the tags
    o1, o2 = "<think>a</think>\\boxed{1}", "<think>b</think>\\boxed{2}"
    assert sc_span(o1 + SC + o2) == (len(o1) + 2, len(o1 + SC))
    assert SC.startswith("\n\n<") and SC.endswith(">\n\n") and SC.count("\n") == 5


def test_baseline_suffix_asks_for_the_graded_format_and_no_correction():
    assert "self-correction" not in BASELINE_SUFFIX
    assert "<think> </think>" in BASELINE_SUFFIX and "\\boxed{}" in BASELINE_SUFFIX


def test_split_plain_sc():
    o1, o2 = split_response("<think>a</think>\\boxed{1}" + SC + "<think>b</think>\\boxed{2}")
    assert (o1, o2) == ("<think>a</think>\\boxed{1}", "<think>b</think>\\boxed{2}")


@pytest.mark.parametrize(
    "sep",
    [
        "< self-correction >\n</ self-correction >",
        "<self-correction></self-correction>",
        "<self-correction >  < /self-correction>",
        "\n<\tself-correction>\n\n</self-correction\n>",
    ],
)
def test_split_tolerates_whitespace_inside_tags(sep):
    assert split_response(f"A {sep} B") == ("A", "B")


def test_no_correction_and_lone_opening_tag():
    assert split_response("  just o1 \n") == ("just o1", None)
    # An opening tag without its closing tag is not a correction: the text stays one part.
    assert split_response("x <self-correction> y") == ("x <self-correction> y", None)


def test_two_corrections_stay_in_o2_and_rounds_split_all():
    text = "one" + SC + "two" + SC + "three"
    assert split_response(text) == ("one", "two" + SC + "three")
    assert split_rounds(text) == ["one", "two", "three"]
    assert split_rounds("only") == ["only"]


def test_sc_span_offsets():
    text = "o1" + SC + "o2"
    a, b = sc_span(text)
    assert text[:a] == "o1\n\n" and text[b:] == "o2" and text[a:b] == SC.lstrip("\n")


def test_presets_and_overrides():
    for name in PRESETS:
        cfg = preset(name)
        assert cfg.n_train >= cfg.n_rollouts
    assert preset("gspo-n16").n_rollouts == 16 and preset("gspo-n16").augment == "none"
    assert preset("octopus-8b-stage1", lr=2e-6).lr == 2e-6
    # GRPO / DAPO clip 0.2 / 0.28 (the paper's setup); the released GRPO script: 0.2 / 0.3 + KL
    assert preset("grpo-n8").ratio == "token" and preset("grpo-n8").clip_high == 0.28
    released = preset("grpo-n16-released")
    assert (released.clip_high, released.kl_coef, released.kl_tokens) == (0.3, 0.01, "response")
    assert (released.weight_decay, released.warmup_steps) == (0.01, 0)
    assert preset("dapo-n16").clip_high == 0.28 and preset("dapo-n16").agg == "token"
    assert preset("dapo-n16").clip_dual == 10.0  # the released DAPO script's dual clip
    assert (
        preset("octopus-8b-stage1").clip_low == 3e-4 and preset("octopus-8b-stage1").n_train == 16
    )
    with pytest.raises(ValueError, match="unknown Config field"):
        preset("gspo-n8", learning_rate=1.0)
    with pytest.raises(ValueError, match="unknown preset"):
        preset("nope")
