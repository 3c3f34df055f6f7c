"""Run under torchrun by test_relaunch.py: `TINY [train.py flags]`, train.py's own `main` on two
tiny presets registered here (a sequence "relaunch": a 2-step cold start that keeps its
checkpoints, then a 3-step Stage I), so a relaunch, a stop signal and the exit are the launch's.

The RL stage grades with a reward drawn from each text's md5: on the random tiny model every
rollout would get the same reward and no weight would move, so a resume that lost a step's
state would still end "equal".
"""

import dataclasses
import hashlib
import os
import sys

import config
import train

tiny, flags = sys.argv[1], sys.argv[2:]
SMALL = dict(
    model=tiny, sft_data="synthetic:64", train_data="synthetic:64", val_data="", val_every=0,
    prompts_per_step=4, mini_batch_prompts=2, n_rollouts=4, n_train=8, max_prompt_len=384,
    max_response_len=24, kv_cache_gb=0.1, save_every=0, lr=1e-3, warmup_steps=1, sft_batch=4,
    gradient_checkpointing=True, dump_every=0, max_images=1,
)  # fmt: skip
config.PRESETS["relaunch-sft"] = dict(
    config.PRESETS["demo-sft"], **SMALL, max_steps=2, sft_stop_acc=0.0, sft_stop_format=0.0,
    keep_finished_checkpoints=True,
)  # fmt: skip
config.PRESETS["relaunch-1"] = dict(config.PRESETS["demo-1"], **SMALL, max_steps=3)
config.SEQUENCES["relaunch"] = ["relaunch-sft", "relaunch-1"]


def md5_reward(score_batch):
    def scored(texts, truths, **kw):
        out = score_batch(texts, truths, **kw)
        return [dataclasses.replace(s, reward=int(hashlib.md5(t.encode()).hexdigest()[:8], 16)
                                    / 16**8) for s, t in zip(out, texts, strict=True)]  # fmt: skip

    return scored


train.score_batch = md5_reward(train.score_batch)
train.main(flags)
sys.stdout.flush()
sys.stderr.flush()
# as tests/torchrun_train.py: every file is written; leave without the interpreter's teardown
os._exit(0)
