"""Run under torchrun by test_rollout: each rank starts its own engine for its own prompts."""

import sys

import torch
import torch.distributed as dist
from transformers import AutoProcessor

from data import synthetic_task
from rollout import Sampling, VLLMEngine, render_prompt

tiny_path, out_dir = sys.argv[1], sys.argv[2]
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
processor = AutoProcessor.from_pretrained(tiny_path)
prompts = [render_prompt(processor, e["messages"]) for e in synthetic_task(2, seed=100 + rank)]
engine = VLLMEngine(tiny_path, max_model_len=512, kv_cache_gb=0.1, seed=rank)
groups = engine.generate(prompts, 3, Sampling(max_tokens=8))
total = torch.tensor([float(rank + 1)])
dist.all_reduce(total)  # the trainer's process group still works beside the engines
with open(f"{out_dir}/rank{rank}.txt", "w") as f:
    f.write(
        f"rank {rank} of {world}\ngroups {len(groups)}x{len(groups[0])}\nallreduce {total.item()}\n"
    )
    f.write(repr([[g.ids for g in grp] for grp in groups]))
engine.close()  # closes the shared default group too
if dist.is_initialized():
    dist.destroy_process_group()
