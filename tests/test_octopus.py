"""The self-correction format (arXiv 2602.08503, Sec. 3)."""

import re

import pytest

from octopus import (
    BASELINE_SUFFIX,
    OCTOPUS_SUFFIX,
    SC,
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


def test_the_format_module_imports_nothing_but_re():
    """octopus.py is copied on its own: it may import only the standard library's `re`."""
    import ast
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "octopus.py")
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module)
    assert imported == {"__future__", "re"}
