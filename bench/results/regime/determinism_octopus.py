"""The determinism check of determinism.json: 4 Octopus RL steps (2 Stage I + 2 Stage II, lr
1e-4) from a rare-regime cold start under SRC (seed0/cold/export, seed0/rl, data/dev, as
bench/toy_replication.py's --work lays them out) into OUT; prints the export's sha256. Run it
twice into empty OUTs and compare the two metrics.jsonl (time_* removed) and the sha256.

    .venv/bin/python bench/results/regime/determinism_octopus.py SRC OUT PORT
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path[:0] = [ROOT, os.path.join(ROOT, "bench")]
os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                  MASTER_PORT=sys.argv[3], VLLM_ENABLE_V1_MULTIPROCESSING="0")  # fmt: skip

import toy_replication as toy  # noqa: E402

import train  # noqa: E402

src, out = sys.argv[1], sys.argv[2]
scale = dict(toy.RARE_SCALES["full"], steps=4, val_every=2, dev_curve=32)
model, engine = None, None
for k, cfg in enumerate(toy.rare_arm_configs("octopus", 0, scale, src, 1e-4)):
    cfg = cfg.replace(out_dir=os.path.join(out, f"stage{k + 1}"))
    model, engine = train.run_stage(cfg if model is None else cfg.replace(model=model), engine)
engine.close()
print("SHA", toy.checkpoint_sha(model))
