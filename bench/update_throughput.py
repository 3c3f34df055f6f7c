"""Trained tokens per second of the update (forward, backward, AdamW step), with token-budget
micro-batches (train.py: sorted by length, packed up to a token budget) vs plain padded
micro-batches of a fixed count in data order, for the tiny model and a ~30M-parameter one.

    torchrun --nproc_per_node=1 bench/update_throughput.py
"""

from __future__ import annotations

import os
import random
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import train  # noqa: E402
from data import synthetic_task  # noqa: E402
from octopus import preset  # noqa: E402
from rollout import render_prompt  # noqa: E402
from tiny import build_tiny, tiny_config  # noqa: E402


def build_30m(tiny_path: str, out: str) -> str:
    """The tiny checkpoint's tokenizer and processor with a ~30M-parameter text model."""
    from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

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


def items_for(processor, n: int, seed: int = 0) -> list:
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    prompts = [
        train.encode_prompt(processor, render_prompt(processor, e["messages"]))
        for e in synthetic_task(8, seed=seed)
    ]
    plain = min(processor.tokenizer.all_special_ids)  # ids below the special tokens: ordinary text
    items = []
    for k in range(n):
        length = rng.choice([24, 48, 96, 192, 384])  # mixed lengths, as rollouts are
        items.append(train.Item(prompts[k % 8], torch.randint(0, plain, (length,), generator=g).tolist(),
                                torch.ones(length), torch.zeros(length), rng.gauss(0, 1), -torch.rand(length) * 3))  # fmt: skip
    return items


def timed_update(t, items, chunks: list[list[int]]) -> float:
    start = time.perf_counter()
    t.optimizer.zero_grad(set_to_none=True)
    for chunk in chunks:
        train.accumulate_gradients(t, [items[i] for i in chunk])
    t.optimizer.step()
    return time.perf_counter() - start


def main() -> None:
    rank, world, device = train.setup_distributed()
    tiny = build_tiny(os.path.join(tempfile.gettempdir(), "octopus-bench-tiny"))
    big = build_30m(tiny, os.path.join(tempfile.gettempdir(), "octopus-bench-30m"))
    print(
        f"machine: {os.cpu_count()} cores, CPU, fp32, {world} rank(s); 32 sequences of 24-384 response tokens + ~180 prompt tokens"
    )
    print("| model | parameters | micro-batching | trained tokens/s | seconds per update |")
    print("| --- | --- | --- | --- | --- |")
    for name, path, budget in (("tiny", tiny, 8192), ("30M", big, 8192)):
        cfg = preset(
            "demo",
            stage="2",
            kl_coef=0.0,
            model=path,
            update_token_budget=budget,
            gradient_checkpointing=False,
        )
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(path)
        model = train.load_model(path, cfg, device)
        optimizer, scheduler = train.make_optimizer(model, cfg, 10)
        t = train.Trainer(cfg, model, None, optimizer, scheduler, None, processor, device, [], [])
        items = items_for(processor, 32)
        tokens = sum(len(it.ids) for it in items)
        n_params = sum(p.numel() for p in model.parameters())
        per_padded = max(
            1, budget // (max(it.length for it in items))
        )  # same memory bound as the budget
        padded = [
            list(range(i, min(i + per_padded, len(items))))
            for i in range(0, len(items), per_padded)
        ]
        whole = [list(range(len(items)))]  # accumulate_gradients packs by the token budget itself
        timed_update(t, items, whole)  # warm-up
        for label, chunks in (
            ("token budget (sorted, packed)", whole),
            (f"padded, {per_padded} per micro-batch", padded),
        ):
            dt = timed_update(t, items, chunks)
            print(f"| {name} | {n_params / 1e6:.1f}M | {label} | {tokens / dt:.0f} | {dt:.2f} |")
        del t, model, optimizer


if __name__ == "__main__":
    main()
