"""The self-correction format of Octopus (arXiv 2602.08503, Sec. 3), and nothing else.

A response is one generation `o1 + SC + o2` (arXiv 2602.08503, Sec. 3): `o1` is `<think>...</think>` and a
`\\boxed{}` answer, `SC` the empty `<self-correction>` tag pair, `o2` a new answer from scratch.
A response may stop after `o1`. The prompt suffixes are verbatim: the released checkpoint was
trained with them. This module imports nothing but `re`: copy it freely.
"""

from __future__ import annotations

import re

# ---------------------------------------------------------------------------------------------
# The format (arXiv 2602.08503, Sec. 3), verbatim: the released checkpoint was trained with these.
# ---------------------------------------------------------------------------------------------

SC = "\n\n<self-correction>\n</self-correction>\n\n"

OCTOPUS_SUFFIX = (
    "\n\nYou first think through your reasoning process as an internal monologue, enclosed within"
    " <think> </think> tags. Then, provide your final answer enclosed within \\boxed{}. If you"
    " believe the answer can be further enhanced, generate <self-correction> </self-correction>"
    " tags enclosed with no content, and regenerate a new reasoning process and a new answer from"
    " scratch after that. The new response should first think through your reasoning process as"
    " an internal monologue, enclosed within <think> </think> tags. Then, provide your final"
    " answer enclosed within \\boxed{}. All reasoning, answer steps must be included without"
    " omission."
)

BASELINE_SUFFIX = (
    "\n\nYou first think through the reasoning process as an internal monologue, enclosed within"
    " <think> </think> tags. Then, provide your final answer enclosed within \\boxed{}."
)

# The opening tag alone is what `--direct` decoding stops at (direct reasoning only).
SC_OPEN = "<self-correction>"

# Whitespace is tolerated inside the tags (`< self-correction >`, `</ self-correction>`): models
# drift there and the released grader strips it too. Content between the two tags is dropped.
_SC_OPEN_RE = re.compile(r"<\s*self-correction\s*>")
_SC_CLOSE_RE = re.compile(r"<\s*/\s*self-correction\s*>\s*")


def sc_span(text: str, start: int = 0) -> tuple[int, int] | None:
    """Character span `[a, b)` of the first SC separator at or after `start`, or None.

    `a` is where the opening tag begins; `b` is where the next part begins, past the closing tag
    and the whitespace after it. `text[:a]` is o1 plus its trailing whitespace.
    """
    opening = _SC_OPEN_RE.search(text, start)
    if opening is None:
        return None
    closing = _SC_CLOSE_RE.search(text, opening.end())
    if closing is None:
        return None
    return opening.start(), closing.end()


def split_response(text: str) -> tuple[str, str | None]:
    """Split a response at its first SC into `(o1, o2)`; `o2` is None without a correction.

    A second correction stays inside `o2` (the paper trains one round; reward.format_reward then
    marks `o2` malformed, and the final answer is still o2's last box). Both parts are stripped.
    """
    span = sc_span(text)
    if span is None:
        return text.strip(), None
    return text[: span[0]].strip(), text[span[1] :].strip()


def split_rounds(text: str) -> list[str]:
    """All parts of a response separated by SC: `[o1, o2, o3, ...]` (forced rounds, Fig. 7a)."""
    parts, pos = [], 0
    while (span := sc_span(text, pos)) is not None:
        parts.append(text[pos : span[0]].strip())
        pos = span[1]
    parts.append(text[pos:].strip())
    return parts
