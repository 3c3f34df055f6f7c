"""Engines that need processes of their own, run by test_rollout.py (vLLM's in-process engines
share global state: a second engine in the test process cannot be closed without breaking the
first). One launch serves two tests:

    torchrun --nproc_per_node=2 tests/torchrun_engines.py TINY OUT

Each rank starts its own engine and samples for its own prompts beside the trainer's process
group. Rank 0's engine (rank 0 says what it clamps) is the odd one: started with random weights
(load_format="dummy"), a too-long context, two images per prompt and narrowed pixel limits, then
synced with the real weights before it samples its prompts.
"""

import json
import sys

import torch
from transformers import AutoProcessor

from data import dots_image, synthetic_task
from rollout import Sampling, VLLMEngine, render_prompt


def two_image_prompt(processor) -> dict:
    """A chat with two dot images (2 and 5 dots) and one question."""
    import random

    rng = random.Random(3)
    content = [{"type": "image", "image": dots_image(2, rng)},
               {"type": "image", "image": dots_image(5, rng)},
               {"type": "text", "text": "How many dots are in the two images together?"}]  # fmt: skip
    return render_prompt(processor, [{"role": "user", "content": content}])


def dummy(tiny_path: str, processor, out_dir: str) -> VLLMEngine:
    """Rank 0's engine: random weights, checked against the loaded engine once synced."""
    from safetensors.torch import load_file

    prompts = [render_prompt(processor, e["messages"]) for e in synthetic_task(4)]
    engine = VLLMEngine(tiny_path, max_model_len=100_000, kv_cache_gb=0.1, seed=0, max_images=2,
                        min_pixels=2048, max_pixels=9 * 32 * 32, load_format="dummy")  # fmt: skip
    greedy = Sampling(temperature=0.0, max_tokens=16)
    result = {"max_model_len": engine.max_model_len, "image_size": engine.image_size}
    result["random"] = [g[0].ids for g in engine.generate(prompts[:2], 1, greedy)]
    engine.wake(["weights"])  # the trainer's order (a no-op here: the engine never slept)
    engine.sync_weights(load_file(f"{tiny_path}/model.safetensors").items())
    engine.wake(["kv_cache"])
    synced = engine.generate(prompts[:2], 1, greedy)
    result["synced"] = [[g[0].ids, g[0].logprobs] for g in synced]
    two = engine.generate([two_image_prompt(processor)], 2, Sampling(max_tokens=12))[0]
    result["two_images"] = [[g.ids, g.logprobs] for g in two]
    # a 512x512 image: the engine's own processing, capped at max_pixels
    from PIL import Image
    from vllm import SamplingParams

    big = render_prompt(processor, [{"role": "user", "content": [
        {"type": "image", "image": Image.new("RGB", (512, 512), "red")}, {"type": "text", "text": "?"}]}])  # fmt: skip
    request = {"prompt": big["prompt"], "multi_modal_data": {"image": big["images"]}}
    out = engine.llm.generate([request], SamplingParams(max_tokens=1), use_tqdm=False)[0]
    pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    result["big_image_tokens"] = out.prompt_token_ids.count(pad)
    with open(f"{out_dir}/dummy.json", "w") as f:
        json.dump(result, f)
    return engine


def main(tiny_path: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    processor = AutoProcessor.from_pretrained(tiny_path)
    if rank == 0:
        engine = dummy(tiny_path, processor, out_dir)
    else:
        engine = VLLMEngine(tiny_path, max_model_len=512, kv_cache_gb=0.1, seed=rank)
    prompts = [render_prompt(processor, e["messages"]) for e in synthetic_task(2, seed=100 + rank)]
    groups = engine.generate(prompts, 3, Sampling(max_tokens=8))
    total = torch.tensor([float(rank + 1)])
    dist.all_reduce(total)  # the trainer's process group still works beside the engines
    with open(f"{out_dir}/rank{rank}.txt", "w") as f:
        f.write(f"rank {rank} of {world}\ngroups {len(groups)}x{len(groups[0])}\n"
                f"allreduce {total.item()}\n")  # fmt: skip
        f.write(repr([[g.ids for g in grp] for grp in groups]))
    engine.close()  # closes the shared default group too
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
