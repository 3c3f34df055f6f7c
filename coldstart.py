"""Cold-start data by mixed sampling (PAPER.md §6, Sec. 4.1): o1 from the policy, o2 from a
stronger model that sees the question, the ground truth and o1; rows `o1 + SC + o2` that
`train.py --stage sft` trains on.

    python coldstart.py --policy Qwen/Qwen3-VL-8B-Instruct --strong Qwen/Qwen3-VL-30B-A3B-Instruct \\
        --data data/llava-cot.jsonl --out data/coldstart.jsonl
    python coldstart.py --policy ... --in-distribution ...   # both parts from the policy

For each input: `--samples` (4) o1 candidates from the policy, graded; for each o1 with an
answer, an o2 from the strong model with the paper's instructions (a complete new answer that
leads to the ground truth, correcting the reference implicitly and never mentioning it, in the
`<think>` / `\\boxed{}` format, not too short); only o2 that are well-formed and correct are
kept. Counts at every filter are printed and saved beside the output.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

from data import load_examples, synthetic_task  # noqa: E402
from octopus import OCTOPUS_SUFFIX, SC, split_response  # noqa: E402
from reward import answer_of, format_reward, score_batch  # noqa: E402

STRONG_INSTRUCTION = (
    "\n\nBelow is a reference answer to this question. It may contain mistakes.\n"
    "Reference answer:\n{o1}\n\n"
    "The correct final answer is {truth}.\n"
    "Write a new, complete answer from scratch that reasons to the correct final answer. If the "
    "reference answer has mistakes, correct them implicitly: never mention the reference answer, "
    "and never say that you were given the correct answer. First think through your reasoning "
    "process as an internal monologue, enclosed within <think> </think> tags. Then, provide your "
    "final answer enclosed within \\boxed{{}}. Do not be too brief: include every reasoning step."
)


def strong_messages(example: dict, o1: str) -> list[dict]:
    """The strong model's chat: the question (with its images, without the Octopus suffix), the
    policy's o1 as a reference, the ground truth, and the paper's instructions."""
    content = []
    for item in example["messages"][0]["content"]:
        if item["type"] == "text":
            text = item["text"].replace(OCTOPUS_SUFFIX, "")
            item = {
                "type": "text",
                "text": text + STRONG_INSTRUCTION.format(o1=o1, truth=example["answer"]),
            }
        content.append(item)
    return [{"role": "user", "content": content}]


def question_row(example: dict, images_dir: str, rel: str) -> dict:
    """A data.py row for `example`: the question text (suffix removed) and its images saved as
    PNG files under `images_dir`, referenced relative to the output file."""
    texts, paths = [], []
    for item in example["messages"][0]["content"]:
        if item["type"] == "image":
            name = f"{example['id']}_{len(paths)}.png".replace("/", "_")
            item["image"].save(os.path.join(images_dir, name))
            paths.append(os.path.join(rel, name))
            texts.append("<image>")
        else:
            texts.append(item["text"].replace(OCTOPUS_SUFFIX, ""))
    return {
        "id": example["id"],
        "question": "".join(texts),
        "answer": example["answer"],
        "images": paths,
    }


def build(
    policy_engine,
    strong_engine,
    processor,
    examples: list[dict],
    *,
    samples: int,
    sampling,
    out: str,
) -> dict:
    """Write the cold-start JSONL to `out`; return the counts at every filter."""
    from rollout import render_prompt

    counts = {"inputs": len(examples), "o1_samples": 0, "o1_with_answer": 0, "o1_correct": 0,
              "o2_generated": 0, "o2_well_formed": 0, "o2_correct": 0, "written": 0}  # fmt: skip
    prompts = [render_prompt(processor, e["messages"]) for e in examples]
    groups = policy_engine.generate(prompts, samples, sampling)
    pairs = []  # (example index, o1)
    for k, group in enumerate(groups):
        for g in group:
            counts["o1_samples"] += 1
            o1, _ = split_response(g.text)  # a policy that already corrects itself: keep o1
            if answer_of(o1):
                counts["o1_with_answer"] += 1
                pairs.append((k, o1))
    o1_scores = score_batch(
        [o1 for _, o1 in pairs], [examples[k]["answer"] for k, _ in pairs], kind="baseline"
    )
    counts["o1_correct"] = sum(s.acc_final == 1.0 for s in o1_scores)
    strong_prompts = [render_prompt(processor, strong_messages(examples[k], o1)) for k, o1 in pairs]
    o2s = (
        [g[0].text.strip() for g in strong_engine.generate(strong_prompts, 1, sampling)]
        if pairs
        else []
    )
    counts["o2_generated"] = len(o2s)
    o2_scores = score_batch(o2s, [examples[k]["answer"] for k, _ in pairs], kind="baseline")
    images_dir = os.path.join(os.path.dirname(os.path.abspath(out)), "images")
    os.makedirs(images_dir, exist_ok=True)
    with open(out, "w") as f:
        for (k, o1), o2, s in zip(pairs, o2s, o2_scores, strict=True):
            if format_reward(o2) != 1.0 or SC in o2:
                continue
            counts["o2_well_formed"] += 1
            if s.acc_final != 1.0:
                continue
            counts["o2_correct"] += 1
            row = question_row(examples[k], images_dir, "images")
            row["response"] = o1 + SC + o2
            f.write(json.dumps(row) + "\n")
            counts["written"] += 1
    return counts


def main(argv: list[str] | None = None) -> dict:
    from transformers import AutoProcessor

    from rollout import Sampling, VLLMEngine

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--policy", required=True)
    ap.add_argument("--strong", default="", help="the stronger model (default: the policy)")
    ap.add_argument("--in-distribution", action="store_true", help="o2 from the policy too")
    ap.add_argument("--data", required=True, help="JSONL / parquet / HF folder, or synthetic:N")
    ap.add_argument("--out", required=True)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--max-model-len", type=int, default=16384)
    ap.add_argument("--kv-cache-gb", type=float, default=1.0)
    args = ap.parse_args(argv)

    if args.data.startswith("synthetic:"):
        examples = synthetic_task(int(args.data.split(":")[1]), seed=777)
    else:
        examples, report = load_examples(args.data)
        print(f"[coldstart] {report.summary()}", file=sys.stderr)
    processor = AutoProcessor.from_pretrained(args.policy)
    sampling = Sampling(temperature=args.temperature, max_tokens=args.max_tokens)
    kw = dict(max_model_len=args.max_model_len, kv_cache_gb=args.kv_cache_gb)
    policy = VLLMEngine(args.policy, **kw)
    strong = (
        policy if args.in_distribution or not args.strong or args.strong == args.policy else None
    )
    if strong is None:
        # o1 first with the policy alone, then the strong model alone: one engine in memory
        from rollout import render_prompt

        prompts = [render_prompt(processor, e["messages"]) for e in examples]
        cached = policy.generate(prompts, args.samples, sampling)
        policy.close()
        strong = VLLMEngine(args.strong, **kw)
        policy = _Replay(cached)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    counts = build(
        policy, strong, processor, examples, samples=args.samples, sampling=sampling, out=args.out
    )
    with open(args.out + ".counts.json", "w") as f:
        json.dump(counts, f, indent=1)
    print(json.dumps(counts, indent=1))
    strong.close()
    return counts


class _Replay:
    """Hands back generations made earlier (so the policy's engine can be closed first)."""

    def __init__(self, groups):
        self.groups = groups

    def generate(self, prompts, n, sampling, prefixes=None):
        return self.groups


if __name__ == "__main__":
    main()
