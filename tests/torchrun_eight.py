"""Run under `torchrun --nproc_per_node=8` by test_eight_ranks.py: `OUT_DIR TINY_PATH DATA`.

Stage I, then Stage II from Stage I's export, in one launch (the engine of each rank reused),
on a file that mixes image rows and text-only rows: what one 8-GPU node runs, on 8 gloo ranks.
"""

import sys

import train
from config import preset

out_dir, tiny, data = sys.argv[1], sys.argv[2], sys.argv[3]
small = dict(
    model=tiny, train_data=data, val_data="", prompts_per_step=8, mini_batch_prompts=8,
    n_rollouts=2, n_train=4, max_prompt_len=300, max_response_len=16, kv_cache_gb=0.05,
    warmup_steps=0, save_every=0, dump_every=0, gradient_checkpointing=True, out_dir=out_dir,
)  # fmt: skip
stages = [preset("demo-1", **small, max_steps=1), preset("demo-2", **small, max_steps=1)]
stages = [c.replace(out_dir=f"{out_dir}/stage-{c.stage}") for c in stages]
engine = train.run_sequence(stages)
engine.close()  # last: under torchrun its teardown takes the default process group along
