"""Rule-based reward (arXiv 2602.08503, Eq. 3 and Eq. 6): extraction, equivalence, format,
the guards, and linear time on degenerate model text."""

import re
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from octopus import SC
from reward import (
    MAX_ANSWER_CHARS,
    Score,
    boxed_span,
    format_reward,
    grader_stats,
    is_equivalent,
    octopus_reward,
    response_reward,
    score,
    score_batch,
    strip_tag_whitespace,
)

GOOD_W = "<think>try</think>\n\\boxed{3}"  # well-formed, wrong against truth "4"
GOOD_C = "<think>again</think>\n\\boxed{4}"  # well-formed, correct


def sc(o1: str, o2: str) -> str:
    return o1 + SC + o2


def extract_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` in `text` (braces nested), or None."""
    span = boxed_span(text)
    return None if span is None else text[span[0] : span[1]]


# --------------------------------------------------------------------------- extraction


@pytest.mark.parametrize(
    "text, expected",
    [
        ("\\boxed{42}", "42"),
        ("a \\boxed{1} b \\boxed{2} c", "2"),  # the LAST box
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # nested braces
        ("\\boxed{{a}{b{c}}}", "{a}{b{c}}"),
        ("\\boxed{}", ""),  # an empty box is found, and is empty
        ("no box here", None),
        ("\\boxed{1} then \\boxed{2", None),  # last box unclosed: no answer, no fallback
        ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),  # escaped braces are literal
        ("\\boxed {7}", "7"),
        ("\\fbox{8}", "8"),
        ("}}}\\boxed{5}{{{", "5"),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


def test_extract_boxed_deeply_nested_and_huge_is_fast():
    deep = "\\boxed{" + "{" * 5000 + "x" + "}" * 5000 + "}"
    t = time.monotonic()
    assert extract_boxed(deep) == "{" * 5000 + "x" + "}" * 5000
    assert extract_boxed("\\boxed{" + "{" * 100_000) is None  # unbalanced
    # linear: milliseconds; a quadratic scan of the 100k braces: hours. Loose enough for a
    # loaded machine
    assert time.monotonic() - t < 10.0


# --------------------------------------------------------------------------- format


@pytest.mark.parametrize(
    "part, expected",
    [
        ("<think>r</think>\\boxed{1}", 1.0),
        ("<think>\nr\n</think>\n\nThe answer is \\boxed{1}.", 1.0),
        ("< think >r</ think >\\boxed{1}", 1.0),  # whitespace around < > / is removed first
        ("<think>r</think>", 0.0),  # no box
        ("\\boxed{1}<think>r</think>", 0.0),  # box before the thinking only
        ("<think>r</think><think>s</think>\\boxed{1}", 0.0),  # two thinks
        ("r</think>\\boxed{1}", 0.0),
        ("<think>r\\boxed{1}", 0.0),
        ("<think>r</think>\\boxed{1", 0.0),
        ("", 0.0),
    ],
)
def test_format_reward(part, expected):
    assert format_reward(part) == expected


# The released code's normalisation, kept here as the reference the linear scan must equal.
_RELEASED_TAG_SPACE_RE = re.compile(r"\s*([</>])\s*")


def _released_format_reward(part: str) -> float:
    s = _RELEASED_TAG_SPACE_RE.sub(r"\1", part.strip())
    if s.count("<think>") != 1 or s.count("</think>") != 1 or not s.startswith("<think>"):
        return 0.0
    after = s[s.index("</think>") + len("</think>") :]
    box = after.find("\\boxed{")
    return 1.0 if box >= 0 and "}" in after[box + len("\\boxed{") :] else 0.0


# ASCII and Unicode whitespace (\x1c, \x85, NBSP, U+2028, U+3000 are all `\s` in Python)
_FORMAT_ALPHABET = " \n\t\r\x0b\x0c\x1c\x85\xa0\u2028\u3000</>ab{}"


@settings(max_examples=2000, deadline=None)
@given(st.text(alphabet=_FORMAT_ALPHABET, max_size=40))
def test_strip_tag_whitespace_equals_released_regex(text):
    assert strip_tag_whitespace(text) == _RELEASED_TAG_SPACE_RE.sub(r"\1", text)


_TAGGY = st.lists(
    st.sampled_from(["<think>", "</think>", "\\boxed{", "}", "< think >", "</ think>", " ", "\n"])
    | st.text(alphabet=_FORMAT_ALPHABET, max_size=4),
    max_size=12,
).map("".join)


@settings(max_examples=2000, deadline=None)
@given(_TAGGY)
def test_format_reward_equals_released_on_tag_soup(part):
    assert format_reward(part) == _released_format_reward(part)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("a \n b", "a \n b"),  # a run between two letters stays
        ("a \n< b", "a<b"),  # a run touching a tag character goes, on both sides
        ("x / y > z", "x/y>z"),
        ("  <  ", "<"),
        ("", ""),
    ],
)
def test_strip_tag_whitespace_examples(text, expected):
    assert strip_tag_whitespace(text) == expected


# --------------------------------------------------------------------------- Eq. 3 / Eq. 6


@pytest.mark.parametrize(
    "o1, o2, r_prime, acc1, acc2",
    [
        (GOOD_W, GOOD_C, 1.0, 0.0, 1.0),  # wrong -> correct
        ("<think>x</think>\\boxed{4}", GOOD_C, 0.75, 1.0, 1.0),  # correct -> correct
        (GOOD_W, "<think>b</think>\\boxed{5}", 0.0, 0.0, 0.0),  # wrong -> wrong
        (GOOD_C, GOOD_W, -0.25, 1.0, 0.0),  # correct -> wrong
    ],
)
def test_eq3_eq6_every_transition(o1, o2, r_prime, acc1, acc2):
    s = score(sc(o1, o2), "4")
    assert s == Score(0.9 * r_prime + 0.1 * 1.0, 1.0, acc1, acc2, acc2, True)


def test_guard_identical_o1_o2_caps_at_half():
    # c->c would be 0.75; identical parts cap r' at 0.5.
    s = score(sc(GOOD_C, GOOD_C), "4")
    assert s.reward == pytest.approx(0.9 * 0.5 + 0.1)
    # The guard compares stripped text: trailing whitespace does not evade it.
    assert score(sc(GOOD_C + "  \n", GOOD_C), "4").reward == pytest.approx(0.55)


def test_guard_o1_without_box_or_empty_box_caps_at_zero():
    # w->c would be 1.0. No box: r' capped at 0, and fmt(o1) = 0. An empty box is
    # well-formed (fmt 1) but still caps r' at 0.
    cases = [
        ("<think>no answer</think>", 0.0),
        ("<think>x</think>\\boxed{}", 0.1),
        ("<think>x</think>\\boxed{  }", 0.1),
    ]
    for o1, expected in cases:
        s = score(sc(o1, GOOD_C), "4")
        assert s.acc_o1 == 0.0 and s.acc_o2 == 1.0
        assert s.reward == pytest.approx(expected)


def test_guard_malformed_o2_caps_at_half():
    s = score(sc(GOOD_W, "the answer is \\boxed{4}"), "4")  # w->c but o2 has no <think>
    assert (s.acc_o2, s.format) == (1.0, 0.0)
    assert s.reward == pytest.approx(0.9 * 0.5)


@pytest.mark.parametrize(
    "r_prime, fmt_o1, fmt_o2, expected",
    [
        (1.0, 1.0, 1.0, 1.0),
        (0.75, 1.0, 0.0, 0.675),
        (-0.25, 0.0, 1.0, -0.225),
        (0.0, 1.0, 1.0, 0.1),
    ],
)
def test_octopus_reward_is_eq6(r_prime, fmt_o1, fmt_o2, expected):
    assert octopus_reward(r_prime, fmt_o1, fmt_o2) == pytest.approx(expected)


def test_response_reward_from_parts():
    # the reward of already-split parts, without any grading: c->w, both well-formed
    s = response_reward(GOOD_C, GOOD_W, True, False)
    assert s == Score(pytest.approx(0.9 * -0.25 + 0.1), 1.0, 1.0, 0.0, 0.0, True)
    assert response_reward(GOOD_C, None, True, False, kind="baseline").reward == 1.0
    with pytest.raises(ValueError, match="reward kind"):
        response_reward(GOOD_C, None, True, False, kind="grpo")


def test_no_correction_reward_is_centred():
    assert score(GOOD_C, "4").reward == pytest.approx(0.9 * 0.5 + 0.1)
    assert score(GOOD_W, "4").reward == pytest.approx(-0.9 * 0.5 + 0.1)
    s = score("garbage", "4")
    assert s == Score(pytest.approx(-0.45), 0.0, 0.0, None, 0.0, False)


def test_baseline_reward_on_final_part():
    assert score(GOOD_C, "4", kind="baseline").reward == pytest.approx(1.0)
    assert score(GOOD_W, "4", kind="baseline").reward == pytest.approx(0.1)
    assert score("\\boxed{4}", "4", kind="baseline").reward == pytest.approx(0.9)
    s = score(sc(GOOD_W, GOOD_C), "4", kind="baseline")  # the final answer is o2's
    assert (s.reward, s.acc_o1, s.acc_final) == (pytest.approx(1.0), 0.0, 1.0)


def test_two_corrections_in_one_response():
    text = sc(sc(GOOD_W, "<think>b</think>\\boxed{5}"), GOOD_C)
    s = score(text, "4")
    # o2 holds a second round: its final box is right but it is malformed (two thinks).
    assert (s.acc_o1, s.acc_o2, s.format, s.has_correction) == (0.0, 1.0, 0.0, True)
    assert s.reward == pytest.approx(0.9 * 0.5)


def test_spaced_tags_are_a_correction():
    text = GOOD_W + "\n< self-correction >\n</ self-correction >\n" + GOOD_C
    s = score(text, "4")
    assert s.has_correction and s.reward == pytest.approx(1.0)


def test_answer_is_read_after_think():
    # a box inside the thinking does not count when </think> is present
    assert score("<think>\\boxed{4}</think> so \\boxed{3}", "4").acc_o1 == 0.0
    assert score("<think>maybe 3</think> \\boxed{4}", "4").acc_o1 == 1.0


def test_score_batch_matches_score_and_checks_lengths():
    responses = [sc(GOOD_W, GOOD_C), GOOD_C, "nothing", sc(GOOD_C, GOOD_W), "\\boxed{\\sqrt{16}}"]
    truths = ["4"] * 5
    assert score_batch(responses, truths, workers=2) == [score(r, "4") for r in responses]
    with pytest.raises(ValueError, match="2 responses but 1"):
        score_batch(["a", "b"], ["1"])
    with pytest.raises(ValueError, match="reward kind"):
        score(GOOD_C, "4", kind="grpo")


# --------------------------------------------------------------------------- equivalence

# fmt: off
EQUIVALENT = [
    # integers and signs
    ("4", "4"), ("+4", "4"), ("-3", "-3"), ("007", "7"), (" 12 ", "12"), ("12.", "12"),
    ("1000", "1000"), ("0", "0"), ("-0", "0"),
    # decimals
    ("0.5", "0.5"), ("0.50", "0.5"), (".5", "0.5"), ("3.0", "3"), ("2.25", "2.25"),
    ("1e3", "1000"), ("2.5e-1", "0.25"), ("1.5 \\times 10^{3}", "1500"),
    # fractions
    ("\\frac{1}{2}", "0.5"), ("1/2", "\\frac{1}{2}"), ("\\dfrac{3}{4}", "0.75"),
    ("\\tfrac{3}{4}", "3/4"), ("-\\frac{1}{3}", "-1/3"), ("\\frac12", "0.5"), ("2/4", "1/2"),
    ("\\frac{6}{3}", "2"), ("\\frac{-2}{4}", "-0.5"),
    # percents
    ("50\\%", "50"), ("50%", "0.5"), ("12.5%", "12.5"), ("100\\%", "1"),
    # units and degrees
    ("12 cm", "12"), ("12\\text{ cm}", "12"), ("12 \\mathrm{cm}^2", "12"), ("30^\\circ", "30"),
    ("30^{\\circ}", "30"), ("30°", "30"), ("45 degrees", "45"), ("5 units", "5"), ("3 m", "3"),
    ("7 \\text{ sq units}", "7"), ("8 hours", "8"), ("\\$5", "5"), ("5 dollars", "5"),
    # thousands separators
    ("1,000", "1000"), ("12,345", "12345"), ("1{,}000", "1000"), ("1,234.5", "1234.5"),
    # LaTeX decoration
    ("$4$", "4"), ("\\text{4}", "4"), ("\\left(3\\right)", "(3)"), ("\\displaystyle 4", "4"),
    ("\\mathbf{7}", "7"), ("{5}", "5"),
    # multiple choice
    ("B", "B"), ("(B)", "B"), ("B. 12", "B"), ("B: twelve", "B"), ("(C) 7", "C"), ("A", "(A)"),
    ("\\text{B}", "B"), ("D.", "D"),
    # yes / no and short words
    ("Yes", "yes"), ("no", "No"), ("yes.", "Yes"), ("True", "yes"), ("triangle", "Triangle"),
    ("Blue", "blue"), ("\\text{square}", "square"),
    # expressions math-verify decides
    ("\\sqrt{2}/2", "\\frac{\\sqrt{2}}{2}"), ("\\frac{\\sqrt{3}}{2}", "\\frac{\\sqrt3}{2}"),
    ("2\\sqrt{3}", "\\sqrt{12}"), ("x^2+1", "1+x^2"), ("2\\pi", "2\\pi"), ("\\pi/2", "\\frac{\\pi}{2}"), ("\\frac{\\pi}{4}", "\\pi/4"),
]

NOT_EQUIVALENT = [
    ("5", "4"), ("-4", "4"), ("0.51", "0.5"), ("1/3", "0.33"), ("12 cm", "13"), ("4.1", "4"),
    ("40%", "0.5"), ("1,001", "1000"), ("B", "C"), ("(B)", "A"), ("B. 12", "C"), ("E", "B"),
    ("yes", "no"), ("No", "yes"), ("maybe", "yes"), ("circle", "triangle"), ("four", "4"),
    ("2 \\text{ or } 3", "2"), ("2 or 3", "3"), ("A or B", "A"), ("2, 3", "2"), ("x", "4"),
    ("", "4"), ("   ", "4"), ("\\sqrt{2}", "2"), ("2\\pi", "\\pi"), ("x^2", "x^3"),
    ("1e999999999", "1"), ("9**9**9", "1"), ("10^{10^{10}}", "1"), ("1/0", "0"), ("B", "12"),
]
# fmt: on

# A percent on one side is graded the same way round whichever side is the truth: `50%` reads
# as 50 or as 50 / 100 = 0.5; two percents compare their numbers. (a, b, equivalent), checked
# as is_equivalent(a, b) and is_equivalent(b, a).
PERCENTS = [
    ("50%", "0.5", True),
    ("50\\%", "\\frac{1}{2}", True),
    ("12.5%", "0.125", True),
    ("0.5%", "0.005", True),
    ("50%", "50", True),
    ("50%", "50\\%", True),
    ("40%", "0.5", False),  # 40 and 0.4, against 0.5
    ("5%", "50", False),  # 5 and 0.05, against 50
    ("50%", "0.5%", False),  # 0.5 against 0.005 (50 / 100 = 0.5 once matched one way round)
]


@pytest.mark.parametrize("a, b, equivalent", PERCENTS)
def test_percentages_grade_the_same_both_ways(a, b, equivalent):
    assert is_equivalent(a, b) is equivalent
    assert is_equivalent(b, a) is equivalent


@pytest.mark.parametrize("pred, truth", EQUIVALENT)
def test_equivalent(pred, truth):
    assert is_equivalent(pred, truth)


@pytest.mark.parametrize("pred, truth", NOT_EQUIVALENT)
def test_not_equivalent(pred, truth):
    assert not is_equivalent(pred, truth)


# --------------------------------------------------------------------------- adversarial


def test_code_injection_is_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    payloads = [
        f"__import__('os').system('touch {marker}')",
        f"exec(\"open('{marker}','w')\")",
        f"eval(\"__import__('pathlib').Path('{marker}').touch()\")",
        f"(lambda: __import__('os').system('touch {marker}'))()",
        f"\\text{{__import__('os').system('touch {marker}')}}",
    ]
    for p in payloads:
        assert not is_equivalent(p, "0")
        assert score(f"<think>x</think>\\boxed{{{p}}}", "0").reward < 0
    assert not marker.exists()


@pytest.mark.parametrize(
    "pred",
    [
        "9**9**9**9",
        "100000000!",
        "(" * 5000 + "1" + ")" * 5000,
        "2^{2^{2^{2^{2^{2^{2^{2}}}}}}}",
        "1" * 100_000,
        "\\frac{" * 40 + "1" + "}{2}" * 40,
        "1\x002",
        "{{{{{",
        "}}}}}",
        "\\sqrt{" * 200,
    ],
)
def test_adversarial_answers_return_in_bounded_time(pred):
    t = time.monotonic()
    assert not is_equivalent(pred, "1", timeout_s=2.0)
    # the 2 s deadline + a worker respawn (seconds on a loaded machine), never a hang
    assert time.monotonic() - t < 2.0 + 30.0


def test_long_answers_are_not_parsed():
    before = grader_stats()["graded"] + grader_stats()["timeouts"]
    assert not is_equivalent("\\sqrt{2}" * (MAX_ANSWER_CHARS // 8 + 1), "\\sqrt{2}")
    assert grader_stats()["graded"] + grader_stats()["timeouts"] == before


def test_timeout_is_counted_and_scores_wrong():
    before = grader_stats()["timeouts"]
    assert not is_equivalent("100000000!", "1", timeout_s=0.5)
    assert grader_stats()["timeouts"] == before + 1
    assert is_equivalent("\\sqrt{4}", "2")  # the respawned worker still grades


def test_malformed_responses_never_crash_scoring():
    junk = [
        "",
        "\x00\x00",
        "<think>" * 1000,
        "\\boxed{" * 1000,
        "}" * 1000,
        SC * 50,
        "<self-correction>" * 100,
        "\\boxed{\\boxed{\\boxed{1}}}",
        "\ud800" * 3,
    ]
    # no correction: 0.9 (acc - 0.5) + 0.1 fmt, wrong and unformatted: -0.45; SC * 50 is a
    # correction from an o1 without a box (r' = 0, fmt 0): 0.0; the innermost of nested boxes
    # is the answer, 1, right but unformatted: 0.45
    expected = [-0.45] * 5 + [0.0, -0.45, 0.45, -0.45]
    got = [s.reward for s in score_batch(junk, ["1"] * len(junk))]
    assert got == pytest.approx(expected)


# --------------------------------------------------------------------------- linear time

M = 1_000_000
NO_ANSWER = Score(pytest.approx(0.9 * (0.0 - 0.5)), 0.0, 0.0, None, 0.0, False)
# 1M-character degenerate responses and their hand-worked scores against truth "1". A
# quadratic parse of any of them takes hours; a linear one well under a second.
DEGENERATE = {
    "whitespace run": (" \t\r\n" * (M // 4), NO_ANSWER),
    "newlines": ("\n" * M, NO_ANSWER),
    "<think> repeated": ("<think>" * (M // 7), NO_ANSWER),
    "'< / > ' repeated": ("< / > " * (M // 6), NO_ANSWER),
    "\\boxed{ repeated": ("\\boxed{" * (M // 7), NO_ANSWER),  # every box unclosed
    "{ run": ("{" * M, NO_ANSWER),
    "<self-correction> repeated": ("<self-correction>" * (M // 17), NO_ANSWER),  # never closed
    "one letter": ("a" * M, NO_ANSWER),
    # the case (50 s at 100k newlines with the released regex): right and well-formed
    "newlines inside the thinking": (
        "<think>x" + "\n" * M + "x</think>\\boxed{1}",
        Score(pytest.approx(0.9 * 0.5 + 0.1), 1.0, 1.0, None, 1.0, False),
    ),
    # c->w with whitespace runs in both parts: Eq. 6 = 0.9 * -0.25 + 0.1 * min(1, 1)
    "runs in o1 and o2": (
        "<think>x" + "\n" * (M // 2) + "x</think>\\boxed{1}" + SC
        + "<think>" + " " * (M // 2) + "</think>\\boxed{2}",
        Score(pytest.approx(-0.125), 1.0, 1.0, 0.0, 0.0, True),
    ),
    # 25k corrections: o2 holds all but the first; no box anywhere, r' capped at 0
    "SC repeated": (("x" + SC) * (M // 40), Score(0.0, 0.0, 0.0, 0.0, 0.0, True)),
}  # fmt: skip


@pytest.mark.parametrize("name", list(DEGENERATE))
def test_degenerate_million_char_responses_score_in_linear_time(name):
    text, expected = DEGENERATE[name]
    assert len(text) >= M - 40
    t = time.monotonic()
    got = score_batch([text], ["1"])[0]
    assert time.monotonic() - t < 20.0  # linear: ~0.3 s; the released regex: hours
    assert got == expected
