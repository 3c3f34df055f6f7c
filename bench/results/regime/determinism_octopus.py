"""4 Octopus RL steps (2 Stage I + 2 Stage II, lr 1e-4) from a rare-regime cold start copied to
SRC (seed0/cold/export, seed0/rl, data/dev) into OUT; prints the export's sha256. Run twice from
empty OUTs and compare metrics.jsonl (time_* removed) and the sha."""
import os, sys
sys.path.insert(0, "/work/wt-regime"); sys.path.insert(0, "/work/wt-regime/bench")
os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                  MASTER_PORT=sys.argv[3], VLLM_ENABLE_V1_MULTIPROCESSING="0")
import toy_replication as toy
import train
src, out = sys.argv[1], sys.argv[2]
scale = dict(toy.RARE_SCALES["full"], steps=4, val_every=2, dev_curve=32)
cfgs = toy.rare_arm_configs("octopus", 0, scale, src, 1e-4)
model, engine = None, None
for k, cfg in enumerate(cfgs):
    cfg = cfg.replace(out_dir=os.path.join(out, f"stage{k+1}"))
    model, engine = train.run_stage(cfg if model is None else cfg.replace(model=model), engine)
engine.close()
print("SHA", toy.checkpoint_sha(model))
