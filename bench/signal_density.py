"""How dense is the self-correction signal before and after augmentation (arXiv 2602.08503, Sec. 3.2)?

From real rollouts of a cold-started tiny model (the demo's SFT export by default): the share
of w->c samples among the generated rollouts vs among the trained samples after augmentation
with each mode (paper / released / random / none), and the positive share per group.

    python bench/signal_density.py [--model runs/demo/stage-sft/export] [--prompts 64]
"""

from __future__ import annotations

import argparse
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

from augment import splice_group, split_rollout, transition_counts  # noqa: E402
from data import synthetic_task  # noqa: E402
from octopus import SC  # noqa: E402
from reward import score_batch  # noqa: E402
from rollout import Sampling, VLLMEngine, render_prompt  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="runs/demo/stage-sft/export")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--n", type=int, default=8)
    args = ap.parse_args()
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(args.model)
    tok = processor.tokenizer
    engine = VLLMEngine(args.model, max_model_len=512, kv_cache_gb=0.25)
    examples = synthetic_task(args.prompts, seed=4242)
    groups = engine.generate([render_prompt(processor, e["messages"]) for e in examples], args.n,
                             Sampling(temperature=1.0, max_tokens=96))  # fmt: skip
    sc_ids, eos = tok.encode(SC, add_special_tokens=False), tok.convert_tokens_to_ids("<|im_end|>")
    rollouts = []
    for e, group in zip(examples, groups, strict=True):
        scores = score_batch(
            [tok.decode(g.ids, skip_special_tokens=True) for g in group], [e["answer"]] * len(group)
        )
        rollouts.append([split_rollout(g.ids, tok, s) for g, s in zip(group, scores, strict=True)])
    generated = [r for group in rollouts for r in group]
    print(
        f"machine: {os.cpu_count()} cores, CPU; model {args.model}; {args.prompts} prompts x n = {args.n}, N = {2 * args.n}"
    )
    print(
        "| samples | count | w->c | c->c | c->w | w->w | no correction | w->c share | positive share per group (mean, min-max) | ... in mixed groups (min-max) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    # mixed: some of the group's originals end right and some wrong (Algorithm 1 balances these)
    mixed = [0 < sum(r.final_correct for r in g) < len(g) for g in rollouts]

    def row(name, samples, per_group):
        c = transition_counts(samples)
        shares = [
            sum(s.o2_correct if s.o1_sc_len is not None else s.o1_correct for s in g) / len(g)
            for g in per_group
        ]
        in_mixed = [x for x, m in zip(shares, mixed, strict=True) if m]
        # a policy that is always right or always wrong has no mixed group to report
        span = f"{min(in_mixed):.2f}-{max(in_mixed):.2f}" if in_mixed else "no mixed group"
        print(f"| {name} | {len(samples)} | {c['wc']} | {c['cc']} | {c['cw']} | {c['ww']} | {c['none']} | "
              f"{c['wc'] / len(samples):.3f} | {sum(shares) / len(shares):.2f} ({min(shares):.2f}-{max(shares):.2f}) | "
              f"{span} |")  # fmt: skip

    class _Final:  # originals as samples: positive = final answer correct
        def __init__(self, r):
            self.o1_sc_len, self.o1_correct = r.o1_sc_len, r.o1_correct
            self.o2_correct = r.o2_correct

    row("generated", [_Final(r) for r in generated], [[_Final(r) for r in g] for g in rollouts])
    for mode in ("none", "random", "released", "paper"):
        rng = random.Random(0)
        per_group = [splice_group(g, 2 * args.n, sc_ids, eos, mode=mode, rng=rng, tokenizer=tok)
                     for g in rollouts]  # fmt: skip
        row(f"trained ({mode})", [s for g in per_group for s in g], per_group)
    engine.close()


if __name__ == "__main__":
    main()
