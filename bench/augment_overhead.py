"""Time to build rollouts and splice groups for one RL step (the batch shape of the paper's
experimental setup, arXiv 2602.08503): 512 prompts x 8 rollouts of ~2k tokens each, with the
tiny tokenizer (issue: augment.py).

Usage: python bench/augment_overhead.py [--prompts 512] [--tokens 2048]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from augment import splice_group, split_rollout  # noqa: E402
from octopus import SC  # noqa: E402
from reward import score_batch  # noqa: E402
from tiny import build_tiny  # noqa: E402


def fake_response(rng: random.Random, tokens: int) -> str:
    """~`tokens` tokens of o1 + SC + o2 (or o1 only), answers right or wrong at random."""
    words = "the dots are left right so I count again and then we have more of them".split()
    body = " ".join(rng.choice(words) for _ in range(tokens // 2))
    o1 = f"<think>\n{body}\n</think>\n\n\\boxed{{{rng.randint(1, 6)}}}"
    if rng.random() < 0.3:
        return o1
    return o1 + SC + f"<think>\n{body}\n</think>\n\n\\boxed{{{rng.randint(1, 6)}}}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=512, help="prompts per step")
    parser.add_argument("--tokens", type=int, default=2048, help="about this many per rollout")
    args = parser.parse_args()
    prompts, tokens = args.prompts, args.tokens
    n, n_train = 8, 16
    from transformers import AutoTokenizer

    path = build_tiny(os.path.join(tempfile.gettempdir(), "octopus-bench-tiny"))
    tok = AutoTokenizer.from_pretrained(path)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    sc_ids = tok.encode(SC, add_special_tokens=False)
    rng = random.Random(0)
    texts = [fake_response(rng, tokens) for _ in range(prompts * n)]
    ids = [tok.encode(t, add_special_tokens=False) + [eos] for t in texts]
    truths = [str(rng.randint(1, 6)) for _ in range(prompts)]
    mean_len = sum(map(len, ids)) / len(ids)

    t0 = time.perf_counter()
    scores = score_batch(texts, [truths[i // n] for i in range(len(texts))], workers=2)
    t1 = time.perf_counter()
    rollouts = [split_rollout(x, tok, s) for i, (x, s) in enumerate(zip(ids, scores, strict=True))]
    t2 = time.perf_counter()
    samples = 0
    for p in range(prompts):
        group = splice_group(
            rollouts[p * n : (p + 1) * n], n_train, sc_ids, eos, rng=rng, tokenizer=tok
        )
        samples += len(group)
    t3 = time.perf_counter()

    print(f"machine: {os.cpu_count()} cores; {prompts} prompts x {n} rollouts, "
          f"{mean_len:.0f} tokens each; {samples} training samples")  # fmt: skip
    print("| phase | seconds | per rollout (ms) |")
    print("| --- | --- | --- |")
    for name, dt in (
        ("score_batch", t1 - t0),
        ("split_rollout", t2 - t1),
        ("splice_group", t3 - t2),
    ):
        print(f"| {name} | {dt:.2f} | {1000 * dt / len(ids):.2f} |")
    print(
        f"| augment total (split_rollout + splice) | {t3 - t1:.2f} | {1000 * (t3 - t1) / len(ids):.2f} |"
    )


if __name__ == "__main__":
    main()
