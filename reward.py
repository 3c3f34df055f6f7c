"""The verifiable reward of Octopus (arXiv 2602.08503, Eq. 3 and Eq. 6), and how it is graded.

Read top-down: the paper's rewards first, `correction_reward` (r' of Eq. 3, with the released
code's guards against reward hacking) and `octopus_reward` (Eq. 6); then `response_reward`, the
reward of one split response (Eq. 6, the no-correction reward, or the baselines' reward), and
`score` / `score_batch`, which grade whole responses. Below them, the grading machinery: the
answer a part gives (the last `\\boxed{...}` after `</think>`), its format fmt(o), and acc(o),
the equivalence check (an eval-free fast path, then math-verify in worker processes).
Self-contained (imports only `octopus.split_response`): copy it into another trainer.

Model output is untrusted text. Nothing here evaluates it as code; every parse of a response is
linear in its length (no backtracking regex over model text); box contents over
`MAX_ANSWER_CHARS` score 0 unparsed; only what the fast path leaves undecided goes to
math-verify, in worker processes that the parent kills at a hard deadline (math-verify's own
timeout is SIGALRM-based, so it does not fire in threads and gmpy2 factorials ignore it).

Public API: `correction_reward`, `octopus_reward`, `response_reward`, `score`, `score_batch`,
`Score`, `answer_of`, `format_reward`, `is_equivalent`.
"""

from __future__ import annotations

import json
import os
import re
import select
import subprocess
import sys
import threading
from dataclasses import dataclass
from fractions import Fraction

from octopus import split_response

MAX_ANSWER_CHARS = 300  # no real answer is longer; longer ones are not parsed at all
MAX_EXPONENT = 400  # 1e999999999 must not become a billion-digit integer
DEFAULT_TIMEOUT_S = 3.0
WORKER_MEMORY_BYTES = 2 * 1024**3
REWARD_KINDS = ("octopus", "baseline")

# =============================================================================================
# The rewards: Eq. 3 (with the released guards), Eq. 6, without a correction, the baselines'
# =============================================================================================


def correction_reward(
    acc_o1: float, acc_o2: float, *, identical: bool, o1_answered: bool, o2_format: float
) -> float:
    """r' of Eq. 3, the shaped reward of a response with a correction, on (acc(o1), acc(o2)):

        wrong -> correct  1.0        correct -> correct  0.75
        wrong -> wrong    0.0        correct -> wrong   -0.25

    capped by the released code's guards against reward hacking: o1 identical to o2 caps it at
    0.5; o1 without a (non-empty) box caps it at 0; fmt(o2) = 0 caps it at 0.5. It takes the
    facts, not the texts, so spliced samples that exist only as token ids use it too.
    """
    r = {(0, 1): 1.0, (1, 1): 0.75, (0, 0): 0.0, (1, 0): -0.25}[(int(acc_o1), int(acc_o2))]
    if identical:
        r = min(r, 0.5)
    if not o1_answered:
        r = min(r, 0.0)
    if o2_format == 0.0:
        r = min(r, 0.5)
    return r


def octopus_reward(r_prime: float, fmt_o1: float, fmt_o2: float) -> float:
    """Eq. 6, the training reward of a response with a correction:
    `0.9 r' + 0.1 min(fmt(o1), fmt(o2))`, with r' from `correction_reward`."""
    return 0.9 * r_prime + 0.1 * min(fmt_o1, fmt_o2)


@dataclass(frozen=True)
class Score:
    """The graded response: `reward` trains, the rest is logged."""

    reward: float
    format: float  # min(fmt(o1), fmt(o2)) with a correction, fmt of the graded part without
    acc_o1: float
    acc_o2: float | None  # None without a correction
    acc_final: float
    has_correction: bool


def response_reward(
    o1: str, o2: str | None, acc_o1: bool, acc_o2: bool, *, kind: str = "octopus"
) -> Score:
    """The reward of one split response, given the correctness of its parts.

    `kind="octopus"`: with a correction, Eq. 6 of r' (Eq. 3 with the guards); without one, the
    released code's `0.9 (acc - 0.5) + 0.1 fmt` (Eq. 6 needs two parts, and centring keeps a
    plain right answer below a w->c correction). `kind="baseline"` (GRPO / DAPO / GSPO and
    validation): `0.9 acc + 0.1 fmt` of the final part, o2 when present.
    """
    if kind not in REWARD_KINDS:
        raise ValueError(f"reward kind must be 'octopus' or 'baseline', got {kind!r}")
    a1 = float(acc_o1)
    a2 = None if o2 is None else float(acc_o2)
    if kind == "baseline":
        final, acc_final = (o1, a1) if o2 is None else (o2, a2)
        fmt = format_reward(final)
        return Score(0.9 * acc_final + 0.1 * fmt, fmt, a1, a2, acc_final, o2 is not None)
    if o2 is None:
        fmt = format_reward(o1)
        return Score(0.9 * (a1 - 0.5) + 0.1 * fmt, fmt, a1, None, a1, False)
    fmt_o1, fmt_o2 = format_reward(o1), format_reward(o2)
    # The released split leaves `<self-correction>` inside o1, so its identity guard never
    # fires; the stripped texts are compared here, which is the guard's intent.
    r_prime = correction_reward(
        a1,
        a2,
        identical=o1.strip() == o2.strip(),
        o1_answered=bool((answer_of(o1) or "").strip()),
        o2_format=fmt_o2,
    )
    fmt = well_formed(fmt_o1, fmt_o2)
    return Score(octopus_reward(r_prime, fmt_o1, fmt_o2), fmt, a1, a2, a2, True)


def score(response: str, ground_truth: str, *, kind: str = "octopus") -> Score:
    """Grade one response: `response_reward` of its parts, each part's answer checked against
    `ground_truth`. A malformed response scores low, never raises."""
    return score_batch([response], [ground_truth], kind=kind, workers=1)[0]


def score_batch(
    responses: list[str],
    ground_truths: list[str],
    *,
    kind: str = "octopus",
    workers: int = 2,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> list[Score]:
    """`score` over a batch: the fast path in this process, the rest across `workers` grader
    processes with a hard per-item deadline of `timeout_s` seconds. Linear in the length of
    every response, so a degenerate one (a 1M-character whitespace run) costs milliseconds."""
    if len(responses) != len(ground_truths):
        raise ValueError(f"{len(responses)} responses but {len(ground_truths)} ground truths")
    if kind not in REWARD_KINDS:
        raise ValueError(f"reward kind must be 'octopus' or 'baseline', got {kind!r}")
    parts = [split_response(r) for r in responses]
    pairs, where = [], []
    for i, (o1, o2) in enumerate(parts):
        for which, part in ((1, o1), (2, o2)):
            answer = answer_of(part) if part is not None else None
            if answer:  # a missing or empty box is simply wrong
                where.append((i, which))
                pairs.append((answer, str(ground_truths[i])))
    verdicts = _equivalent_many(pairs, workers=workers, timeout_s=timeout_s)
    acc = dict(zip(where, verdicts, strict=True))
    return [
        response_reward(o1, o2, acc.get((i, 1), False), acc.get((i, 2), False), kind=kind)
        for i, (o1, o2) in enumerate(parts)
    ]


# =============================================================================================
# The grading machinery: a part's answer, fmt(o), acc(o) (what `score_batch` calls)
# =============================================================================================

# ---------------------------------------------------------------------------------------------
# Extraction: the last \boxed{...}, read after </think>
# ---------------------------------------------------------------------------------------------

_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")


def boxed_span(text: str) -> tuple[int, int] | None:
    """`(content_start, close)` of the LAST `\\boxed{...}` whose braces balance, or None.

    `text[content_start:close]` is the content and `close + 1` is just past its closing brace.
    Braces nest; escaped `\\{` `\\}` are literal and do not count. A last box left unclosed
    (truncated generation) means no answer: an earlier box is not a fallback for it.
    One pass to find the last opening, one brace scan after it: linear in `len(text)`.
    """
    start = None
    for m in _BOXED_RE.finditer(text):
        start = m.end()
    if start is None:
        return None
    depth, i, n = 1, start, len(text)
    while i < n:
        ch = text[i]
        if ch == "\\":
            i += 2  # skip the escaped character, whatever it is
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return start, i
        i += 1
    return None


def answer_span(part: str) -> tuple[int, int] | None:
    """`boxed_span` of the box that answers one part (o1 or o2): the last box after `</think>`
    when there is a `</think>`, else the last box (the answer that acc of Eq. 3 grades)."""
    think_end = max(part.rfind("</think>"), 0)
    span = boxed_span(part[think_end:])
    return None if span is None else (span[0] + think_end, span[1] + think_end)


def answer_of(part: str) -> str | None:
    """The answer of one part (o1 or o2), or None when it has no closed box."""
    span = answer_span(part)
    return None if span is None else part[span[0] : span[1]]


# ---------------------------------------------------------------------------------------------
# Format: fmt(o) of Eq. 6
# ---------------------------------------------------------------------------------------------

_WHITESPACE_RUN_RE = re.compile(r"(\s+)")
_TAG_CHARS = frozenset("</>")


def strip_tag_whitespace(text: str) -> str:
    """`text` without the whitespace runs that touch `<`, `/` or `>`.

    Equal to the released code's `re.sub(r"\\s*([</>])\\s*", r"\\1", text)`, in linear time:
    that regex retries its `\\s*` at every character of a whitespace run that no tag character
    ends, which is quadratic (50 s for one answer holding 100k newlines).
    """
    # re.split with a group alternates text and maximal whitespace runs: runs at odd indices
    pieces = _WHITESPACE_RUN_RE.split(text)
    for i in range(1, len(pieces), 2):
        if pieces[i - 1][-1:] in _TAG_CHARS or pieces[i + 1][:1] in _TAG_CHARS:
            pieces[i] = ""
    return "".join(pieces)


def format_reward(part: str) -> float:
    """fmt(o) of Eq. 6: 1.0 if `o` has exactly one `<think>` and one `</think>` and reads
    `<think>.*</think>.*\\boxed{.*}.*`, else 0.0. Whitespace around `<`, `>`, `/` is removed
    first, as in the released code. Linear time (no backtracking regex over model text)."""
    s = strip_tag_whitespace(part.strip())
    if s.count("<think>") != 1 or s.count("</think>") != 1 or not s.startswith("<think>"):
        return 0.0
    after = s[s.index("</think>") + len("</think>") :]
    box = after.find("\\boxed{")
    return 1.0 if box >= 0 and "}" in after[box + len("\\boxed{") :] else 0.0


def well_formed(fmt_o1: float, fmt_o2: float | None) -> float:
    """The format of every part a response has: fmt(o1), and min(fmt(o1), fmt(o2)) when it
    corrected itself (`fmt_o2` None: it stopped after o1, a choice the format allows, not a
    broken format). Eq. 6's own min, and what train.py and eval.py log as `format`."""
    return fmt_o1 if fmt_o2 is None else min(fmt_o1, fmt_o2)


# ---------------------------------------------------------------------------------------------
# Equivalence: acc of Eq. 3, an eval-free fast path, then math-verify behind a process boundary
# ---------------------------------------------------------------------------------------------

_LATEX_WRAPPERS_RE = re.compile(
    r"\\(?:text|textbf|textit|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}"
)
_LATEX_NOISE_RE = re.compile(r"\\(?:displaystyle|left|right|!|,|;|:|quad|qquad)|\\ |~|\$")
_DEGREE_RE = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\\circ|°|\\degree")
_UNIT_RE = re.compile(
    r"\s*(?:sq\.?\s*|square\s+|cubic\s+)?(?:cm|mm|km|m|in|inch|inches|ft|feet|foot|yd|yards?|mi|"
    r"miles?|meters?|metres?|centimeters?|millimeters?|kilometers?|units?|degrees?|deg|kg|g|mg|"
    r"lbs?|pounds?|s|sec|secs|seconds?|min|mins|minutes?|h|hr|hrs|hours?|days?|weeks?|years?|"
    r"l|ml|liters?|litres?|dollars?|cents?|rad|radians?|people|persons?|students?)"
    r"\s*(?:\^\s*\{?\s*[23]\s*\}?|²|³)?\.?$",
    re.IGNORECASE,
)
_HEDGE_RE = re.compile(r"\b(?:or|and)\b|\\lor|\\vee|\bvs\b|;", re.IGNORECASE)
_CHOICE_TRUTH_RE = re.compile(r"^\(?([A-J])\)?\.?$")
_CHOICE_PRED_RE = re.compile(r"^\(?([A-J])(?:\)|\.|:|$|\s)")
_DECIMAL_RE = re.compile(r"^[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE]([+-]?\d+))?$")
_THOUSANDS_RE = re.compile(r"^[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_FRAC_RE = re.compile(r"^([+-]?)\\frac\s*\{([^{}]+)\}\s*\{([^{}]+)\}$")
_FRAC_SHORT_RE = re.compile(r"^([+-]?)\\frac\s*(\d)\s*(\d)$")
_SLASH_RE = re.compile(r"^([^/]+)/([^/]+)$")
_TIMES_TEN_RE = re.compile(r"^(.+?)\s*(?:\\times|\\cdot|x|\*)\s*10\s*\^\s*\{?\s*([+-]?\d+)\s*\}?$")
_YES_NO = {"yes": "yes", "no": "no", "true": "yes", "false": "no", "y": "yes", "n": "no"}


def _normalize(s: str) -> str:
    """Strip LaTeX decoration that never changes a value: wrappers, spacing, `$`, degrees."""
    s = s.strip()
    for _ in range(3):  # nested wrappers such as \text{\textbf{B}}
        s = _LATEX_WRAPPERS_RE.sub(r"\1", s)
    s = _LATEX_NOISE_RE.sub("", s)
    s = _DEGREE_RE.sub("", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("{,}", ",")
    s = s.replace("\\%", "%").replace("\\pi", "π")
    s = re.sub(r"\s+", " ", s).strip().rstrip(".").strip()
    if len(s) > 1 and s[0] == "{" and s[-1] == "}" and s.count("{") == 1:
        s = s[1:-1].strip()
    return s


def _to_number(s: str) -> tuple[Fraction, bool] | None:
    """Exact value of a plain number, fraction, percent or `a x 10^b`, and whether it was a
    percent; None when `s` is not one. No eval; exponents are bounded before use."""
    s = s.strip()
    percent = s.endswith("%")
    if percent:
        s = s[:-1].strip()
    s = _UNIT_RE.sub("", s) if not percent else s
    s = s.replace(" ", "")
    if _THOUSANDS_RE.match(s):
        s = s.replace(",", "")
    value = _plain_number(s)
    if value is None and (m := _TIMES_TEN_RE.match(s)):
        mantissa, exp = _plain_number(m.group(1)), int(m.group(2))
        if mantissa is not None and abs(exp) <= MAX_EXPONENT:
            value = mantissa * Fraction(10) ** exp
    if value is None:
        return None
    return value, percent


def _plain_number(s: str) -> Fraction | None:
    if m := _DECIMAL_RE.match(s):
        if m.group(1) is not None and abs(int(m.group(1))) > MAX_EXPONENT:
            return None
        return Fraction(s)
    m = _FRAC_RE.match(s) or _FRAC_SHORT_RE.match(s)
    if m is None and (slash := _SLASH_RE.match(s)):
        m = (None, "", slash.group(1), slash.group(2))
        sign, num, den = m[1], m[2], m[3]
    elif m is not None:
        sign, num, den = m.group(1), m.group(2), m.group(3)
    else:
        return None
    num_v, den_v = _plain_number(num.strip()), _plain_number(den.strip())
    if num_v is None or den_v is None or den_v == 0:
        return None
    value = num_v / den_v
    return -value if sign == "-" else value


def _fast_equivalent(pred: str, truth: str) -> bool | None:
    """True/False when the answer is decided without a parser, None when math-verify must look."""
    p, t = _normalize(pred), _normalize(truth)
    if not p:
        return False
    if p == t or p.replace(" ", "").lower() == t.replace(" ", "").lower():
        return True
    # A hedge ("2 or 3") names several answers; it is right only if the truth is one too.
    if _HEDGE_RE.search(p) and not _HEDGE_RE.search(t):
        return False
    if m := _CHOICE_TRUTH_RE.match(t):
        pm = _CHOICE_PRED_RE.match(p)
        return pm is not None and pm.group(1) == m.group(1)
    if t.lower() in _YES_NO:
        return _YES_NO.get(p.lower().rstrip("!.")) == _YES_NO[t.lower()]
    tn, pn = _to_number(t), _to_number(p)
    if tn is not None and pn is not None:
        return _same_number(pn, tn)
    if tn is not None and re.fullmatch(r"[A-Za-z ]+", p):
        return False  # a word against a number
    if re.fullmatch(r"[A-Za-z][A-Za-z '\-]*", t) and re.fullmatch(r"[A-Za-z][A-Za-z '\-]*", p):
        return False  # two different words: nothing for a math parser to add
    return None


def _same_number(pred: tuple[Fraction, bool], truth: tuple[Fraction, bool]) -> bool:
    """Two `_to_number` values, graded the same way round either way: equal numbers, or a
    percent on ONE side read as its fraction (`50%` and `0.5` match whichever is the truth,
    as math-verify reads them; `50%` and `50` match too, as the released grader, which drops
    `%`, reads them). Two percents compare their numbers: `50%` is not `0.5%`."""
    (pv, p_percent), (tv, t_percent) = pred, truth
    if pv == tv:
        return True
    if p_percent == t_percent:
        return False
    return (pv / 100 if p_percent else pv) == (tv / 100 if t_percent else tv)


def is_equivalent(pred: str, truth: str, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """acc of Eq. 3 for one extracted answer: safe (never evaluates `pred`), bounded time.

    Answers over `MAX_ANSWER_CHARS` or containing NUL are wrong unparsed; a math-verify check
    that passes its deadline is wrong (and counted in `grader_stats()`).
    """
    return _equivalent_many([(pred, truth)], workers=1, timeout_s=timeout_s)[0]


def _rejected(pred: str) -> bool:
    return len(pred) > MAX_ANSWER_CHARS or "\x00" in pred


def _equivalent_many(pairs: list[tuple[str, str]], *, workers: int, timeout_s: float) -> list[bool]:
    results: list[bool | None] = []
    for pred, truth in pairs:
        results.append(False if _rejected(pred) else _fast_equivalent(pred, truth))
    # A group of rollouts repeats its answers: each distinct undecided pair is parsed once.
    pending = list(dict.fromkeys(pairs[i] for i, r in enumerate(results) if r is None))
    if pending:
        slow = dict(zip(pending, _grader_pool(workers).run(pending, timeout_s), strict=True))
        results = [slow[pairs[i]] if r is None else r for i, r in enumerate(results)]
    return [bool(r) for r in results]


# ---------------------------------------------------------------------------------------------
# math-verify workers: separate processes, killed by the parent at the deadline
# ---------------------------------------------------------------------------------------------


# The worker is its own small program, run with `python -c`: it does not depend on where this
# file lies or on its `__main__`, so reward.py works wherever it is copied or vendored. It reads
# lines of JSON `[pred, truth]` and answers `true` / `false` lines. Only math-verify's LaTeX
# extraction is used: its plain-expression extraction hands text to sympy's `parse_expr`, an
# `eval`. Its memory is capped (argv[1] bytes): a pathological parse dies instead of swapping.
_WORKER_PROGRAM = r"""
import json, resource, sys
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
from math_verify import LatexExtractionConfig, parse, verify
config = [LatexExtractionConfig(boxed_match_priority=0)]
print("ready", flush=True)
for line in sys.stdin:
    pred, truth = json.loads(line)
    try:
        gold = parse("\\boxed{" + truth + "}", extraction_config=config, parsing_timeout=None)
        answer = parse("\\boxed{" + pred + "}", extraction_config=config, parsing_timeout=None)
        ok = bool(gold and answer and verify(gold, answer, timeout_seconds=None))
    except Exception:
        ok = False
    print("true" if ok else "false", flush=True)
"""


class _Worker:
    def __init__(self) -> None:
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _WORKER_PROGRAM, str(WORKER_MEMORY_BYTES)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        self.ready = False

    def send(self, pred: str, truth: str) -> None:
        self.proc.stdin.write(json.dumps([pred, truth]) + "\n")
        self.proc.stdin.flush()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


class _GraderPool:
    """A few math-verify worker processes; one item in flight per worker; a worker that passes
    the deadline is killed and replaced, its item scored wrong."""

    START_TIMEOUT_S = 60.0

    def __init__(self) -> None:
        self.workers: list[_Worker] = []
        self.timeouts = 0
        self.graded = 0
        self.lock = threading.Lock()

    def _readline(self, worker: _Worker, timeout_s: float) -> str | None:
        ready, _, _ = select.select([worker.proc.stdout], [], [], max(timeout_s, 0.0))
        return worker.proc.stdout.readline().strip() if ready else None

    def _ensure(self, n: int) -> None:
        while len(self.workers) < n:
            self.workers.append(_Worker())
        for w in self.workers:
            if not w.ready:
                if self._readline(w, self.START_TIMEOUT_S) != "ready":
                    raise RuntimeError("reward.py: the math-verify grader worker did not start")
                w.ready = True

    def run(self, pairs: list[tuple[str, str]], timeout_s: float) -> list[bool]:
        import time

        with self.lock:
            results: list[bool] = [False] * len(pairs)
            queue = list(range(len(pairs)))[::-1]
            busy: dict[int, tuple[int, float]] = {}  # worker slot -> (item, deadline)
            while queue or busy:
                for slot, w in enumerate(self.workers):
                    if slot not in busy and queue:
                        item = queue.pop()
                        w.send(*pairs[item])
                        busy[slot] = (item, time.monotonic() + timeout_s)
                streams = {self.workers[s].proc.stdout: s for s in busy}
                wait = min(d for _, d in busy.values()) - time.monotonic()
                ready, _, _ = select.select(list(streams), [], [], max(wait, 0.0))
                for stream in ready:
                    slot = streams[stream]
                    line = stream.readline().strip()
                    item, _ = busy.pop(slot)
                    if line in ("true", "false"):
                        results[item] = line == "true"
                        self.graded += 1
                    else:  # the worker died (memory limit): replace it, score the item wrong
                        self._replace(slot)
                now = time.monotonic()
                for slot, (_, deadline) in list(busy.items()):
                    if now >= deadline:
                        busy.pop(slot)
                        self.timeouts += 1
                        self._replace(slot)
            return results

    def resize(self, n: int) -> None:
        with self.lock:
            while len(self.workers) > n:
                self.workers.pop().kill()
            self._ensure(n)

    def _replace(self, slot: int) -> None:
        self.workers[slot].kill()
        self.workers[slot] = _Worker()
        self._ensure(len(self.workers))

    def close(self) -> None:
        for w in self.workers:
            w.kill()
        self.workers = []


_POOL: _GraderPool | None = None


def _grader_pool(workers: int) -> _GraderPool:
    global _POOL
    if _POOL is None:
        import atexit

        _POOL = _GraderPool()
        atexit.register(_POOL.close)
    _POOL.resize(max(1, workers))
    return _POOL


def grader_stats() -> dict[str, int]:
    """How many items went to math-verify in this process, and how many hit the deadline."""
    return {"graded": _POOL.graded if _POOL else 0, "timeouts": _POOL.timeouts if _POOL else 0}
