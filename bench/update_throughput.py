"""The update (forward, backward, AdamW step) before and after its two speed-ups, in trained
tokens per second, on the tiny model and a ~30M-parameter one, at the demo's shape and at a
long-prompt shape.

- before: the log-probs of each row taken by indexing `logits[b]` (its backward allocates a
  full-size gradient per row: quadratic in the rows of a micro-batch), every sample with its
  own copy of the prompt;
- after 1: loss.token_logprobs as it is (float32 chunks of views, linear), prompt per sample
  (`--shared_prompt false`);
- after 2: each group's prompt once, its responses packed after it (packing.py, the default).

    .venv/bin/torchrun --nproc_per_node=1 bench/update_throughput.py [--reps 2] [--models tiny,30M]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import fsdp  # noqa: E402
import packing  # noqa: E402
import train  # noqa: E402
from augment import Sample  # noqa: E402
from config import preset  # noqa: E402
from data import synthetic_task  # noqa: E402
from packing import encode_prompt  # noqa: E402
from rollout import render_prompt  # noqa: E402

SHAPES = {
    # the demo: 8 prompts x 16 trained samples, ~180-token prompts (9 visual tokens)
    "demo": dict(groups=8, per_group=16, prompt_words=0, response=(24, 96)),
    # long prompts: 2 prompts of ~1,000 tokens, 16 responses of 300 tokens each
    "long-prompt": dict(groups=2, per_group=16, prompt_words=820, response=(300, 300)),
}


def build_30m(tiny_path: str, out: str) -> str:
    """The tiny checkpoint's tokenizer and processor with a ~30M-parameter text model."""
    from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

    from tiny import tiny_config

    if os.path.exists(os.path.join(out, "config.json")):
        return out
    processor = AutoProcessor.from_pretrained(tiny_path)
    cfg = tiny_config(processor.tokenizer)
    t = cfg.text_config
    t.hidden_size, t.intermediate_size, t.num_hidden_layers = 512, 1408, 8
    t.num_attention_heads, t.num_key_value_heads, t.head_dim = 8, 4, 64
    t.rope_parameters["mrope_section"] = [12, 10, 10]
    cfg.vision_config.out_hidden_size = 512
    torch.manual_seed(0)
    Qwen3VLForConditionalGeneration(cfg).save_pretrained(out)
    processor.save_pretrained(out)
    return out


def groups_for(processor, shape: dict, seed: int = 0) -> list[train.Group]:
    """Groups of random responses (token ids below the special tokens) with advantages and
    old log-probs, as rl_step hands them to the update."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    plain = min(processor.tokenizer.all_special_ids)
    out = []
    for e in synthetic_task(shape["groups"], seed=seed):
        text = e["messages"][0]["content"][-1]
        text["text"] = (
            " ".join(
                rng.choice(["dots", "count", "the", "image"]) for _ in range(shape["prompt_words"])
            )
            + text["text"]
        )
        prompt = encode_prompt(processor, render_prompt(processor, e["messages"]))
        group = train.Group(e, prompt, [], [], [], old_logps=[])
        for j in range(shape["per_group"]):
            n = rng.randint(*shape["response"])
            ids = torch.randint(0, plain, (n,), generator=g).tolist()
            group.samples.append(Sample(ids, "original", None, False, False, (j, j)))
            group.advantages.append(rng.gauss(0, 1))
            group.policy_masks.append(torch.ones(n))
            group.kl_masks.append(torch.zeros(n))
            group.old_logps.append(-torch.rand(n, generator=g) * 3)
        out.append(group)
    return out


def quadratic_token_logprobs(logits, labels, temperature=1.0, chunk=0):
    """The old loop: one `logits[b]` per row (kept here only to measure what it cost)."""
    rows = []
    for b in range(logits.shape[0]):
        row = logits[b].float() / temperature
        rows.append(row.gather(-1, labels[b].unsqueeze(-1)).squeeze(-1) - torch.logsumexp(row, -1))
    return torch.stack(rows)


def per_row_logprobs(model, packed, device, temperature=1.0):
    """`packing.response_logprobs` with the logits of each response as a padded row, read by
    the old loop: the layout of the old update (one row per sample)."""
    inputs = {k: v.to(device) for k, v in packed.inputs.items()}
    logits = model(**inputs, logits_to_keep=packed.predictors, packed_layout=packed.layout).logits[
        0
    ]
    rows = torch.nn.utils.rnn.pad_sequence(list(logits.split(packed.lengths)), batch_first=True)
    labels = torch.nn.utils.rnn.pad_sequence(
        list(packed.labels.split(packed.lengths)), batch_first=True
    )
    logp = quadratic_token_logprobs(rows, labels, temperature)
    return [logp[k, :n] for k, n in enumerate(packed.lengths)]


def timed_update(t, groups) -> float:
    start = time.perf_counter()
    train.update(t, groups)
    return time.perf_counter() - start


def names_of(known: tuple[str, ...]):
    """An argparse type: a comma-separated list of `known` names (a typo fails at parse time,
    before any model is built)."""

    def parse(text: str) -> str:
        unknown = [n for n in text.split(",") if n not in known]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {unknown}; known: {','.join(known)}")
        return text

    return parse


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=2, help="timed updates per variant (median)")
    ap.add_argument("--models", default="tiny,30M", type=names_of(("tiny", "30M")))
    ap.add_argument("--shapes", default="demo,long-prompt", type=names_of(tuple(SHAPES)))
    args = ap.parse_args()
    from tiny import build_tiny

    _, world, device = fsdp.setup_distributed()
    tiny = build_tiny(os.path.join(tempfile.gettempdir(), "octopus-bench-tiny"))
    paths = {"tiny": tiny}
    if "30M" in args.models:
        paths["30M"] = build_30m(tiny, os.path.join(tempfile.gettempdir(), "octopus-bench-30m"))
    print(f"machine: {os.cpu_count()} cores, CPU, float32, {world} rank(s), 1 thread; "
          f"median of {args.reps} updates after a warm-up; token budget 8192")  # fmt: skip
    print(
        "| model | shape | variant | prompt tokens run | trained tokens | trained tokens/s | seconds per update | speed-up |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    from transformers import AutoProcessor

    original = packing.response_logprobs
    for name in args.models.split(","):
        processor = AutoProcessor.from_pretrained(paths[name])
        cfg = preset("demo-2", model=paths[name], update_token_budget=8192, gradient_checkpointing=False,
                     lr=1e-5, warmup_steps=0)  # fmt: skip
        model = fsdp.load_model(paths[name], device)
        optimizer, scheduler = train.make_optimizer(model, cfg, 10)
        t = train.Trainer(cfg, model, None, optimizer, scheduler, None, processor, device, [], [])
        for shape_name in args.shapes.split(","):
            groups = groups_for(processor, SHAPES[shape_name])
            tokens = sum(len(s.ids) for g in groups for s in g.samples)
            prompt_len = groups[0].prompt["input_ids"].shape[1]
            base = None
            for variant, shared, logprob_fn in (
                ("before (row loop, prompt per sample)", False, per_row_logprobs),
                ("after 1 (linear log-probs, prompt per sample)", False, original),
                ("after 2 (prompt once per group)", True, original),
            ):
                t.cfg = cfg.replace(shared_prompt=shared)
                train.response_logprobs = logprob_fn  # what forward_micro_batches calls
                timed_update(t, groups)  # warm-up
                dt = statistics.median(timed_update(t, groups) for _ in range(args.reps))
                base = base or dt
                prompts_run = prompt_len * (
                    len(groups) if shared else sum(len(g.samples) for g in groups)
                )
                print(f"| {name} | {shape_name} | {variant} | {prompts_run} | {tokens} | {tokens / dt:.0f} | "
                      f"{dt:.2f} | {base / dt:.2f}x |", flush=True)  # fmt: skip
            train.response_logprobs = original
        del t, model, optimizer


if __name__ == "__main__":
    main()
