"""Responses scored per second by `reward.score_batch` on 10k mixed responses (issue: foundation),
and on degenerate ones (issue 12.1: everything that reads model text is linear in its length).

Mixed as a real batch is: most answers decided by the eval-free fast path (numbers, fractions,
letters, words), some LaTeX expressions that go to the math-verify workers, malformed and
adversarial ones, half with a self-correction. Degenerate: what a policy collapsing into
whitespace or repeated tags writes, each response `--degenerate_chars` long.

Usage: python bench/reward_throughput.py [--responses 10000] [--degenerate_chars 100000]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from octopus import SC  # noqa: E402
from reward import grader_stats, score_batch  # noqa: E402

ANSWERS = [  # (answer written by the model, ground truth)
    ("12", "12"), ("13", "12"), ("\\frac{1}{2}", "0.5"), ("0.25", "1/4"), ("B", "B"), ("(C) 4", "B"),
    ("30^\\circ", "30"), ("1,000", "1000"), ("yes", "No"), ("50\\%", "0.5"), ("12 cm", "12"),
    ("\\sqrt{2}/2", "\\frac{\\sqrt{2}}{2}"), ("2\\sqrt{3}", "\\sqrt{12}"), ("x^2+1", "1+x^2"),
    ("2 \\text{ or } 3", "2"), ("9**9**9", "1"), ("", "3"),
]  # fmt: skip
SLOW = {"\\sqrt{2}/2", "2\\sqrt{3}", "x^2+1"}  # the ones math-verify decides


def make_batch(n: int, seed: int = 0, slow: bool = True) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    answers = ANSWERS if slow else [a for a in ANSWERS if a[0] not in SLOW]
    responses, truths = [], []
    for _ in range(n):
        (a1, truth), (a2, _) = rng.choice(answers), rng.choice(answers)
        k = str(rng.randint(2, 10**6))  # distinct numbers, so answers repeat only by chance
        a1, a2, truth = (x.replace("2", k) for x in (a1, a2, truth))
        think = "<think>" + "reasoning step. " * rng.randint(20, 200) + "</think>\n\n"
        o1 = think + f"The answer is \\boxed{{{a1}}}."
        if rng.random() < 0.1:
            o1 = o1.replace("</think>", "")  # malformed
        text = o1 + SC + think + f"\\boxed{{{a2}}}" if rng.random() < 0.5 else o1
        responses.append(text)
        truths.append(truth)
    return responses, truths


def degenerate_batch(chars: int) -> dict[str, str]:
    """Degenerate responses of about `chars` characters each, by name."""
    return {
        "whitespace run": " \t\r\n" * (chars // 4),
        "newlines": "\n" * chars,
        "newlines inside the thinking": "<think>x" + "\n" * chars + "x</think>\\boxed{1}",
        "spaces in o1 and o2": "<think>" + " " * (chars // 2) + "</think>\\boxed{1}" + SC
        + "<think>" + " " * (chars // 2) + "</think>\\boxed{2}",
        "<think> repeated": "<think>" * (chars // 7),
        "'< / > ' repeated": "< / > " * (chars // 6),
        "\\boxed{ repeated": "\\boxed{" * (chars // 7),
        "{ run": "{" * chars,
        "<self-correction> repeated": "<self-correction>" * (chars // 17),
        "SC repeated": ("x" + SC) * (chars // 41),
        "one letter": "a" * chars,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--responses", type=int, default=10_000, help="mixed responses per row")
    parser.add_argument(
        "--degenerate_chars", type=int, default=100_000, help="length of each degenerate response"
    )
    args = parser.parse_args()
    n = args.responses
    score_batch(*make_batch(50), workers=2)  # start the workers outside the clock
    rows = []
    for mix, slow in (("with LaTeX expressions", True), ("fast path only", False)):
        responses, truths = make_batch(n, slow=slow)
        for workers in (1, 2) if slow else (2,):
            before = grader_stats()
            t = time.perf_counter()
            scores = score_batch(responses, truths, workers=workers)
            dt = time.perf_counter() - t
            after = grader_stats()
            rows.append((mix, workers, n, dt, n / dt, after["graded"] - before["graded"],
                         after["timeouts"] - before["timeouts"]))  # fmt: skip
    assert len(scores) == n
    mean_chars = sum(map(len, responses)) // n

    degenerate = degenerate_batch(args.degenerate_chars)
    slowest = ("", 0.0)
    before = grader_stats()
    t = time.perf_counter()
    for name, text in degenerate.items():  # one at a time, to name the slowest
        item = time.perf_counter()
        score_batch([text], ["1"], workers=2)
        slowest = max(slowest, (name, time.perf_counter() - item), key=lambda x: x[1])
    dt = time.perf_counter() - t
    after = grader_stats()
    mix = f"degenerate, {args.degenerate_chars // 1000}k chars each"
    rows.append((mix, 2, len(degenerate), dt, len(degenerate) / dt,
                 after["graded"] - before["graded"], after["timeouts"] - before["timeouts"]))  # fmt: skip

    print(f"machine: {os.cpu_count()} cores, {sys.platform}; {n} mixed responses, ~"
          f"{mean_chars} chars each; {len(degenerate)} degenerate ones")  # fmt: skip
    print("| mix | workers | responses | seconds | responses/s | math-verify items | timeouts |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for mix, w, n_, dt, rate, graded, timeouts in rows:
        print(f"| {mix} | {w} | {n_} | {dt:.2f} | {rate:.0f} | {graded} | {timeouts} |")
    print(f"slowest degenerate response: {slowest[0]}, {1000 * slowest[1]:.1f} ms")


if __name__ == "__main__":
    main()
