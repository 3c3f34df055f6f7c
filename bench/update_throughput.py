"""The update (forward, backward, AdamW step) under each packing of a group (packing.py), in
update tokens (the packed rows' tokens: what every layer runs) and trained tokens per second,
on the tiny model and a ~30M-parameter one, for Octopus and GSPO n = 16 groups at the demo's
shape and for random responses at the demo's and a long-prompt shape.

- before: the log-probs of each row taken by indexing `logits[b]` (its backward allocates a
  full-size gradient per row: quadratic in the rows of a micro-batch), a prompt per sample;
- sample: loss.token_logprobs as it is (float32 chunks of views, linear), a prompt per sample;
- prompt: each group's prompt once, its responses packed after it;
- tree: each group as a token tree, every common prefix once (the default).

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
from augment import Sample, loss_masks, splice_group, split_rollout  # noqa: E402
from config import preset  # noqa: E402
from data import synthetic_task  # noqa: E402
from octopus import SC  # noqa: E402
from packing import encode_prompt  # noqa: E402
from reward import score  # noqa: E402
from rollout import render_prompt  # noqa: E402

SHAPES = {
    # the demo: 8 prompts, ~180-token prompts (9 visual tokens), responses of at most 96 tokens:
    # Octopus (8 rollouts of o1 [+ SC + o2] spliced into 16 samples by augment.splice_group)
    "octopus-demo": dict(groups=8, rollouts=8, per_group=16, prompt_words=0, response=96),
    # GSPO n = 16 (16 such rollouts, no splices)
    "gspo-demo": dict(groups=8, rollouts=16, per_group=16, prompt_words=0, response=96),
    # random token ids (nothing shared beyond the prompt), 16 per prompt, 24-96 tokens
    "demo": dict(groups=8, per_group=16, prompt_words=0, response=(24, 96)),
    # long prompts: 2 prompts of ~1,000 tokens, 16 random responses of 300 tokens each
    "long-prompt": dict(groups=2, per_group=16, prompt_words=820, response=(300, 300)),
}
PACKINGS = ("before", "sample", "prompt", "tree")


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


def rollout_text(rng: random.Random, tokens: int) -> str:
    """A rollout of about `tokens` tokens in the format of Sec. 4.1: o1, and in 7 of 10 a
    correction `SC + o2` of about the same length; words drawn at random, so rollouts share
    only what the format makes them share."""
    words = "the dots are left right so I count again and then we have more of them".split()

    def part(n: int) -> str:
        body = " ".join(rng.choice(words) for _ in range(n))
        return f"<think>\n{body}\n</think>\n\n\\boxed{{{rng.randint(1, 6)}}}"

    if rng.random() < 0.3:
        return part(max(tokens - 12, 4))
    return part(max(tokens // 2 - 16, 4)) + SC + part(max(tokens // 2 - 16, 4))


def samples_of(processor, shape: dict, rng: random.Random, g: torch.Generator, truth: str):
    """One group's trained samples and their (policy, KL) masks: random ids, or text rollouts
    (spliced for Octopus) with their Stage II masks, as rl_step hands them to the update."""
    plain = min(processor.tokenizer.all_special_ids)
    if "rollouts" not in shape:
        responses = [torch.randint(0, plain, (rng.randint(*shape["response"]),), generator=g).tolist()
                     for _ in range(shape["per_group"])]  # fmt: skip
        masks = [(torch.ones(len(r)), torch.zeros(len(r))) for r in responses]
    else:
        tok = processor.tokenizer
        eos, sc_ids = (
            tok.convert_tokens_to_ids("<|im_end|>"),
            tok.encode(SC, add_special_tokens=False),
        )
        rollouts = []
        for _ in range(shape["rollouts"]):
            ids = tok.encode(rollout_text(rng, rng.randint(40, shape["response"])),
                             add_special_tokens=False)[: shape["response"] - 1] + [eos]  # fmt: skip
            rollouts.append(split_rollout(ids, tok, score(tok.decode(ids[:-1]), truth)))
        samples = splice_group(rollouts, shape["per_group"], sc_ids, eos, tokenizer=tok, rng=rng,
                               max_len=shape["response"])  # fmt: skip
        responses = [s.ids for s in samples]
        masks = [
            tuple(torch.tensor(m, dtype=torch.float32) for m in loss_masks(s, "2")) for s in samples
        ]
        return samples, masks
    samples = [Sample(r, "original", None, False, False, (k, k)) for k, r in enumerate(responses)]
    return samples, masks


def groups_for(processor, shape: dict, seed: int = 0) -> list[train.Group]:
    """The shape's groups, as rl_step hands them to the update."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
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
        samples, masks = samples_of(processor, shape, rng, g, e["answer"])
        group = train.Group(e, prompt, [], [], samples, old_logps=[])
        for s, (policy, kl) in zip(samples, masks, strict=True):
            group.advantages.append(rng.gauss(0, 1))
            group.policy_masks.append(policy)
            group.kl_masks.append(kl)
            group.old_logps.append(-torch.rand(len(s.ids), generator=g) * 3)
        out.append(group)
    return out


def select_packing(t, cfg, mode: str, rows: list[int]) -> None:
    """Make the trainer's update pack groups as `mode` says, and count the packed rows' tokens
    into `rows` (train.py's `pack` wrapped to count them)."""
    layout = "sample" if mode == "before" else mode
    t.cfg = cfg.replace(packing=layout)

    def pack(segments, rope_index, packing=layout):
        packed = original_pack(segments, rope_index, packing)
        rows.append(packed.inputs["input_ids"].shape[1])
        return packed

    train.pack = pack


original_pack = packing.pack


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
    assert packed.gather is None, "the row loop reads one path per response: packing 'sample'"
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
    ap.add_argument("--shapes", default=",".join(SHAPES), type=names_of(tuple(SHAPES)))
    ap.add_argument("--packings", default="prompt,tree,sample,before", type=names_of(PACKINGS),
                    help="prompt first: the others are compared with it")  # fmt: skip
    args = ap.parse_args()
    from tiny import build_tiny

    _, world, device = fsdp.setup_distributed()
    tiny = build_tiny(os.path.join(tempfile.gettempdir(), "octopus-bench-tiny"))
    paths = {"tiny": tiny}
    if "30M" in args.models:
        paths["30M"] = build_30m(tiny, os.path.join(tempfile.gettempdir(), "octopus-bench-30m"))
    load = os.getloadavg()
    print(f"machine: {os.cpu_count()} cores, CPU, float32, {world} rank(s), 1 thread; "
          f"median of {args.reps} updates after a warm-up; token budget 8192; "
          f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")  # fmt: skip
    print("| model | shape | packing | update tokens | trained tokens | trained tokens/s | "
          "seconds per update | update tokens / prompt's | time / prompt's |")  # fmt: skip
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
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
            results = {}
            for mode in args.packings.split(","):
                rows: list[int] = []
                select_packing(t, cfg, mode, rows)
                train.response_logprobs = per_row_logprobs if mode == "before" else original
                timed_update(t, groups)  # warm-up
                rows.clear()
                dt = statistics.median(timed_update(t, groups) for _ in range(args.reps))
                results[mode] = (sum(rows) // args.reps, dt)
                ref_rows, ref_dt = results.get("prompt", (None, None))
                vs = (
                    f"{sum(rows) // args.reps / ref_rows:.3f} | {dt / ref_dt:.2f}"
                    if ref_rows
                    else " | "
                )
                print(f"| {name} | {shape_name} | {mode} | {sum(rows) // args.reps} | {tokens} | "
                      f"{tokens / dt:.0f} | {dt:.2f} | {vs} |", flush=True)  # fmt: skip
            train.response_logprobs = original
            train.pack = original_pack
        del t, model, optimizer


if __name__ == "__main__":
    main()
