"""The self-correction format (arXiv 2602.08503, Sec. 3) and the Config presets."""

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


def test_sc_and_suffixes_are_verbatim():
    assert SC == "\n\n<self-correction>\n</self-correction>\n\n"
    assert OCTOPUS_SUFFIX.startswith("\n\nYou first think through your reasoning process")
    assert OCTOPUS_SUFFIX.endswith("All reasoning, answer steps must be included without omission.")
    assert (
        "generate <self-correction> </self-correction> tags enclosed with no content"
        in OCTOPUS_SUFFIX
    )
    assert BASELINE_SUFFIX == (
        "\n\nYou first think through the reasoning process as an internal monologue, enclosed "
        "within <think> </think> tags. Then, provide your final answer enclosed within \\boxed{}."
    )


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
