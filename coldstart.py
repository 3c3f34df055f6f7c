"""Cold-start data by mixed sampling (arXiv 2602.08503, Sec. 4.1): o1 from the policy, o2 from a
stronger model that sees the question, the ground truth and o1; rows `o1 + SC + o2` that
`train.py --stage sft` trains on.

    python coldstart.py --policy Qwen/Qwen3-VL-8B-Instruct --strong Qwen/Qwen3-VL-30B-A3B-Instruct \\
        --data data/llava-cot.jsonl --out data/coldstart.jsonl
    python coldstart.py --policy ... --in_distribution ...   # both parts from the policy

For each input: `--samples` (4) o1 candidates from the policy, graded; for each o1 with an
answer, an o2 from the strong model with the paper's instructions (a complete new answer that
leads to the ground truth, correcting the reference implicitly and never mentioning it, in the
`<think>` / `\\boxed{}` format, not too short); only o2 that are well-formed and correct are
kept. Counts at every filter are printed and saved beside the output.

The paper does not give the sampling settings; the defaults are the released pipeline's
(DripNowhy/Octopus, SFT/sft_in_dis_sampling.py and SFT/construct.sh): o1 with the plain prompt
(`--o1_prompt plain`) at temperature 0.6, top-p 0.9, top-k 20, up to 2048 tokens; o2 at
temperature 0.7, top-p 1.0, up to 4096 tokens. Lengths are clamped to what the model allows,
with one line saying so. Images are resized into [256*28*28, 1280*28*28] pixels.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from config import MAX_PIXELS, MIN_PIXELS
from data import (
    decode_examples,
    load_examples,
    max_images_of,
    prompt_length,
    synthetic_size,
    synthetic_task,
)
from octopus import BASELINE_SUFFIX, OCTOPUS_SUFFIX, SC, split_response
from reward import answer_of, format_reward, score_batch

# The released o1 prompt, verbatim: the question, then this (DripNowhy/Octopus,
# SFT/sft_in_dis_sampling.py, PROMPT_TEMPLATE; octopus.BASELINE_SUFFIX up to its newlines).
PLAIN_SUFFIX = (
    "\nYou first think through the reasoning process as an internal monologue, enclosed within"
    " <think> </think> tags. Then, provide your final answer enclosed within \\boxed{}.\n"
)
O1_SUFFIXES = {"plain": PLAIN_SUFFIX, "octopus": OCTOPUS_SUFFIX}

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


def bare_question(example: dict) -> list[dict]:
    """The example's user content without any instruction suffix (the data loaders append the
    Octopus one by default): o1, the strong model and the written row each add their own."""
    content = []
    for item in example["messages"][0]["content"]:
        if item["type"] == "text":
            text = item["text"]
            for suffix in (OCTOPUS_SUFFIX, BASELINE_SUFFIX, PLAIN_SUFFIX):
                text = text.replace(suffix, "")
            item = {"type": "text", "text": text}
        content.append(item)
    return content


def _append_text(content: list[dict], text: str) -> list[dict]:
    """`content` with `text` after its last text item (a new item when it ends with an image)."""
    if content and content[-1]["type"] == "text":
        return [*content[:-1], {"type": "text", "text": content[-1]["text"] + text}]
    return [*content, {"type": "text", "text": text.strip()}]


def o1_messages(example: dict, suffix: str) -> list[dict]:
    """The policy's chat for o1: the question with `suffix` after its last text."""
    return [{"role": "user", "content": _append_text(bare_question(example), suffix)}]


def strong_messages(example: dict, o1: str) -> list[dict]:
    """The strong model's chat: the question (with its images, without an instruction suffix),
    the policy's o1 as a reference, the ground truth, and the paper's instructions."""
    instruction = STRONG_INSTRUCTION.format(o1=o1, truth=example["answer"])
    return [{"role": "user", "content": _append_text(bare_question(example), instruction)}]


def question_row(example: dict, images_dir: str, rel: str) -> dict:
    """A data.py row for `example`: the question text (suffix removed) and its images saved as
    PNG files under `images_dir`, referenced relative to the output file."""
    texts, paths = [], []
    for item in bare_question(example):
        if item["type"] == "image":
            name = f"{example['id']}_{len(paths)}.png".replace("/", "_")
            item["image"].save(os.path.join(images_dir, name))
            paths.append(os.path.join(rel, name))
            texts.append("<image>")
        else:
            texts.append(item["text"])
    return {
        "id": example["id"],
        "question": "".join(texts),
        "answer": example["answer"],
        "images": paths,
    }


def o1_prompts(processor, examples: list[dict], suffix: str) -> list[dict]:
    """The rendered o1 prompts (what the policy's engine is sent)."""
    from rollout import render_prompt

    return [render_prompt(processor, o1_messages(e, suffix)) for e in examples]


def build(
    policy_engine,
    strong_engine,
    processor,
    examples: list[dict],
    *,
    samples: int,
    sampling,
    out: str,
    o2_sampling=None,
    o1_suffix: str = PLAIN_SUFFIX,
) -> dict:
    """Write the cold-start JSONL to `out`; return the counts at every filter. o1 is sampled
    with `sampling` from the question + `o1_suffix`, o2 with `o2_sampling` (default: the same)."""
    from rollout import render_prompt

    counts = {"inputs": len(examples), "o1_samples": 0, "o1_with_answer": 0, "o1_correct": 0,
              "o2_generated": 0, "o2_well_formed": 0, "o2_correct": 0, "written": 0}  # fmt: skip
    groups = policy_engine.generate(o1_prompts(processor, examples, o1_suffix), samples, sampling)
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
    o2_sampling = sampling if o2_sampling is None else o2_sampling
    o2s = (
        [g[0].text.strip() for g in strong_engine.generate(strong_prompts, 1, o2_sampling)]
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--policy", required=True, help="the model being trained (samples o1)")
    ap.add_argument("--strong", default="", help="the stronger model (default: the policy)")
    ap.add_argument("--in_distribution", action="store_true", help="o2 from the policy too")
    ap.add_argument("--data", required=True, help="JSONL / parquet / HF folder, or synthetic:N")
    ap.add_argument("--out", required=True, help="the JSONL to write (images/ beside it)")
    ap.add_argument("--samples", type=int, default=4, help="o1 candidates per input")
    ap.add_argument("--o1_prompt", choices=sorted(O1_SUFFIXES), default="plain",
                    help="instruction after the question for o1: the release's plain one, or "
                    "the Octopus one")  # fmt: skip
    ap.add_argument("--temperature", type=float, default=0.6, help="o1 sampling")
    ap.add_argument("--top_p", type=float, default=0.9, help="o1 sampling")
    ap.add_argument("--top_k", type=int, default=20, help="o1 sampling (0: off)")
    ap.add_argument("--max_tokens", type=int, default=2048, help="o1 sampling")
    ap.add_argument("--o2_temperature", type=float, default=0.7, help="o2 sampling")
    ap.add_argument("--o2_top_p", type=float, default=1.0, help="o2 sampling")
    ap.add_argument("--o2_max_tokens", type=int, default=4096, help="o2 sampling")
    ap.add_argument("--max_model_len", type=int, default=16384, help="the engines' context")
    ap.add_argument("--min_pixels", type=int, default=MIN_PIXELS, help="smallest image area")
    ap.add_argument("--max_pixels", type=int, default=MAX_PIXELS, help="largest image area")
    ap.add_argument("--kv_cache_gb", type=float, default=1.0, help="CPU only: KV-cache size")
    return ap.parse_args(argv)


def samplings(args: argparse.Namespace, budget: int | None = None) -> tuple:
    """The o1 and o2 `Sampling`s of the flags, their lengths capped at `budget` tokens."""
    from rollout import Sampling

    cap = budget if budget is not None else max(args.max_tokens, args.o2_max_tokens)
    o1 = Sampling(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                  max_tokens=min(args.max_tokens, cap))  # fmt: skip
    o2 = Sampling(temperature=args.o2_temperature, top_p=args.o2_top_p,
                  max_tokens=min(args.o2_max_tokens, cap))  # fmt: skip
    return o1, o2


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)  # first: `--help` loads nothing

    from transformers import AutoProcessor

    from fsdp import free_cache
    from rollout import VLLMEngine

    pixels = dict(min_pixels=args.min_pixels, max_pixels=args.max_pixels)
    if (n := synthetic_size(args.data)) is not None:
        examples = synthetic_task(n, seed=777, suffix="")
    else:
        examples, report = load_examples(args.data, suffix="", **pixels)
        print(f"[coldstart] {report.summary()}", file=sys.stderr)
        # the engines take every input at once: decode the images once, here (data.py keeps
        # them encoded at load); an image that does not decode leaves its input out, named
        examples, bad = decode_examples(examples)
        if bad:
            print(f"[coldstart] {len(bad)} inputs left out, an image does not decode: "
                  f"{'; '.join(bad[:5])}", file=sys.stderr)  # fmt: skip
    processor = AutoProcessor.from_pretrained(args.policy)
    suffix = O1_SUFFIXES[args.o1_prompt]
    # No sleep mode: these engines never sleep, and vLLM's sleep-mode allocator is one pool per
    # process (vllm/device_allocator/cumem.py, `CuMemAllocator.get_instance`) that a second
    # engine would share with whatever the first left in it
    kw = dict(max_model_len=args.max_model_len, kv_cache_gb=args.kv_cache_gb,
              max_images=max_images_of(examples), sleep_mode=False, **pixels)  # fmt: skip
    policy = VLLMEngine(args.policy, **kw)
    longest = max((prompt_length(processor, {"messages": o1_messages(e, suffix)}) for e in examples),
                  default=0)  # fmt: skip
    o1_sampling, o2_sampling = samplings(args, policy.max_model_len - longest)
    for name, asked, got in (("max_tokens", args.max_tokens, o1_sampling.max_tokens),
                             ("o2_max_tokens", args.o2_max_tokens, o2_sampling.max_tokens)):  # fmt: skip
        if got < asked:
            print(f"[coldstart] {name} {asked} does not fit the {policy.max_model_len}-token "
                  f"context after the longest prompt ({longest} tokens): using {got}",
                  file=sys.stderr)  # fmt: skip
    strong = (
        policy if args.in_distribution or not args.strong or args.strong == args.policy else None
    )
    if strong is None:
        # o1 first with the policy alone, then the strong model alone: one engine in memory
        prompts = o1_prompts(processor, examples, suffix)
        cached = policy.generate(prompts, args.samples, o1_sampling)
        policy.close()
        del policy
        # the closed engine's memory back to the device before the next one measures what is
        # free (vLLM refuses to start when less than gpu_memory_utilization x the card is)
        free_cache()
        strong = VLLMEngine(args.strong, **kw)
        policy = _Replay(cached)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    counts = build(policy, strong, processor, examples, samples=args.samples, sampling=o1_sampling,
                   out=args.out, o2_sampling=o2_sampling, o1_suffix=suffix)  # fmt: skip
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
