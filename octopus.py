"""The self-correction format of Octopus and the one `Config` with the paper's runs as presets.

A response is one generation `o1 + SC + o2` (PAPER.md §1): `o1` is `<think>...</think>` and a
`\\boxed{}` answer, `SC` the empty `<self-correction>` tag pair, `o2` a new answer from scratch.
A response may stop after `o1`. This module imports nothing from the project: copy it freely.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

# ---------------------------------------------------------------------------------------------
# The format (PAPER.md §1), verbatim: the released checkpoint was trained with these strings.
# ---------------------------------------------------------------------------------------------

SC = "\n\n<self-correction>\n</self-correction>\n\n"

OCTOPUS_SUFFIX = (
    "\n\nYou first think through your reasoning process as an internal monologue, enclosed within"
    " <think> </think> tags. Then, provide your final answer enclosed within \\boxed{}. If you"
    " believe the answer can be further enhanced, generate <self-correction> </self-correction>"
    " tags enclosed with no content, and regenerate a new reasoning process and a new answer from"
    " scratch after that. The new response should first think through your reasoning process as"
    " an internal monologue, enclosed within <think> </think> tags. Then, provide your final"
    " answer enclosed within \\boxed{}. All reasoning, answer steps must be included without"
    " omission."
)

BASELINE_SUFFIX = (
    "\n\nYou first think through the reasoning process as an internal monologue, enclosed within"
    " <think> </think> tags. Then, provide your final answer enclosed within \\boxed{}."
)

# The opening tag alone is what `--direct` decoding stops at (PAPER.md §1, "controllable").
SC_OPEN = "<self-correction>"

# Whitespace is tolerated inside the tags (`< self-correction >`, `</ self-correction>`): models
# drift there and the released grader strips it too. Content between the two tags is dropped.
_SC_OPEN_RE = re.compile(r"<\s*self-correction\s*>")
_SC_CLOSE_RE = re.compile(r"<\s*/\s*self-correction\s*>\s*")


def sc_span(text: str, start: int = 0) -> tuple[int, int] | None:
    """Character span `[a, b)` of the first SC separator at or after `start`, or None.

    `a` is where the opening tag begins; `b` is where the next part begins, past the closing tag
    and the whitespace after it. `text[:a]` is o1 plus its trailing whitespace.
    """
    opening = _SC_OPEN_RE.search(text, start)
    if opening is None:
        return None
    closing = _SC_CLOSE_RE.search(text, opening.end())
    if closing is None:
        return None
    return opening.start(), closing.end()


def split_response(text: str) -> tuple[str, str | None]:
    """Split a response at its first SC into `(o1, o2)`; `o2` is None without a correction.

    A second correction stays inside `o2` (the paper trains one round; reward.format_reward then
    marks `o2` malformed, and the final answer is still o2's last box). Both parts are stripped.
    """
    span = sc_span(text)
    if span is None:
        return text.strip(), None
    return text[: span[0]].strip(), text[span[1] :].strip()


def split_rounds(text: str) -> list[str]:
    """All parts of a response separated by SC: `[o1, o2, o3, ...]` (forced rounds, Fig. 7a)."""
    parts, pos = [], 0
    while (span := sc_span(text, pos)) is not None:
        parts.append(text[pos : span[0]].strip())
        pos = span[1]
    parts.append(text[pos:].strip())
    return parts


# ---------------------------------------------------------------------------------------------
# Config: every hyperparameter in one place; the paper's runs are presets (PAPER.md §7).
# ---------------------------------------------------------------------------------------------


@dataclass
class Config:
    """All knobs of train.py / eval.py / coldstart.py. Defaults are the paper's Octopus Stage I."""

    # what to run
    stage: str = "1"  # "sft" (cold start, §4.1/§6), "1" (Stage I, §4.3), "2" (Stage II)
    model: str = "Qwen/Qwen3-VL-8B-Instruct"  # path of the starting checkpoint (HF format)
    train_data: str = ""  # JSONL / parquet / HF folder (data.py), or "synthetic"
    val_data: str = ""
    out_dir: str = "runs/octopus"
    seed: int = 0

    # the method
    reward_kind: str = "octopus"  # "octopus" (Eq. 6 + guards) or "baseline" (0.9 acc + 0.1 fmt)
    prompt_suffix: str = "octopus"  # "octopus" or "baseline" (PAPER.md §1)
    augment: str = "paper"  # "paper" (Alg. 1), "released", "random", "none" (§3)
    n_rollouts: int = 8  # n generated per prompt
    n_train: int = 16  # N trained per prompt (2n for Octopus; = n for the baselines)

    # the objective (§5)
    ratio: str = "sequence_token"  # "token" (GRPO/DAPO), "sequence" (GSPO), "sequence_token"
    agg: str = "seq"  # "seq" or "token"
    clip_low: float = 3e-4
    clip_high: float = 4e-4
    clip_dual: float = 3.0
    kl_coef: float = 0.01  # Stage I only, on o1 tokens (§4)

    # batch shape (§7)
    prompts_per_step: int = 512
    mini_batch_prompts: int = 128  # one optimizer step per mini-batch
    update_token_budget: int = 16384  # tokens per micro-batch of the update, per rank
    logprob_token_budget: int = 32768  # tokens per micro-batch of the log-prob passes
    max_prompt_len: int = 2048
    max_response_len: int = 6144
    epochs: int = 5
    max_steps: int = 0  # 0: as many as the epochs give

    # optimizer
    lr: float = 1e-6
    weight_decay: float = 0.1
    warmup_steps: int = 10
    grad_clip: float = 1.0
    betas: tuple[float, float] = (0.9, 0.999)

    # sampling
    temperature: float = 1.0
    top_p: float = 1.0
    val_temperature: float = 0.6
    val_top_p: float = 0.95
    val_n: int = 1
    val_max_prompts: int = 0  # 0: the whole validation set

    # images (§7: Qwen's 28x28 pixels per merged token)
    min_pixels: int = 256 * 28 * 28
    max_pixels: int = 1280 * 28 * 28

    # engine
    tensor_parallel: int = 1
    gpu_memory_utilization: float = 0.5
    kv_cache_gb: float = 1.0  # CPU only: vLLM's CPU backend needs an explicit size
    enforce_eager: bool = False

    # SFT (cold start, §6)
    sft_data: str = ""
    sft_max_len: int = 8192
    sft_batch: int = 64  # sequences per optimizer step, all ranks together
    # stop the cold start by measurement (FINDINGS.md): once sampled validation accuracy and the
    # share of well-formed o1 + SC + o2 responses both reach these (0: off)
    sft_stop_acc: float = 0.0
    sft_stop_format: float = 0.0

    # several stages in one launch (the demo): "sft,1,2", each from the previous export
    stages: str = ""
    stage_overrides: dict = field(default_factory=dict)  # {"sft": {...}, "1": {...}, ...}

    # bookkeeping
    resume: bool = True  # continue from the newest complete checkpoint in out_dir
    save_every: int = 20
    val_every: int = 10
    export: bool = True  # HF save_pretrained at the end
    gradient_checkpointing: bool = True
    wandb_project: str = ""
    extra: dict = field(default_factory=dict)  # free-form notes carried into the metrics header

    def replace(self, **changes) -> Config:
        """A copy with `changes`, refusing unknown field names (typos must not pass silently)."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise ValueError(f"unknown Config field(s): {', '.join(unknown)}")
        return dataclasses.replace(self, **changes)


# Baselines use the plain prompt, the plain reward, no augmentation, and n trained = n generated.
_BASELINE = dict(reward_kind="baseline", prompt_suffix="baseline", augment="none")
# GRPO / DAPO: token ratio (Eq. 1), clip 0.2 / 0.28, token-mean aggregation (§5).
# DAPO differs by its clip-higher (0.28); dynamic sampling and overlong shaping are not built.
_GRPO = dict(_BASELINE, ratio="token", agg="token", clip_low=0.2, clip_high=0.2, kl_coef=0.0)
_GSPO = dict(_BASELINE, kl_coef=0.0)

PRESETS: dict[str, dict] = {
    "octopus-8b-stage1": dict(stage="1"),
    "octopus-8b-stage2": dict(stage="2", kl_coef=0.0, model="runs/octopus-stage1/export"),
    "gspo-n8": dict(_GSPO, stage="2", n_rollouts=8, n_train=8),
    "gspo-n16": dict(_GSPO, stage="2", n_rollouts=16, n_train=16),
    "grpo-n8": dict(_GRPO, stage="2", n_rollouts=8, n_train=8),
    "grpo-n16": dict(_GRPO, stage="2", n_rollouts=16, n_train=16),
    "dapo-n16": dict(_GRPO, stage="2", n_rollouts=16, n_train=16, clip_high=0.28),
    # Ablations (Table 3): each changes one thing of the Octopus recipe.
    "ablation-no-augment": dict(stage="1", augment="none", n_train=8),
    "ablation-random-augment": dict(stage="1", augment="random"),
    "ablation-no-stage1": dict(stage="2", kl_coef=0.0),
    "sft": dict(stage="sft", lr=1e-6, epochs=1),
    # The CPU demo (FINDINGS.md): a tiny Qwen3-VL learns to count dots; cold start until sampled
    # accuracy reaches 0.3, then Stage I and Stage II with the RL recipe that learned there.
    "demo": dict(
        stages="sft,1,2",
        model="tiny",
        out_dir="runs/demo",
        sft_data="synthetic:4096",
        train_data="synthetic:4096",
        val_data="synthetic:256",
        prompts_per_step=8,
        mini_batch_prompts=8,
        max_prompt_len=384,
        max_response_len=96,
        update_token_budget=8192,
        logprob_token_budget=16384,
        lr=1e-4,  # 4e-4 (FINDINGS.md) raised the entropy: format at temperature 1.0 fell
        weight_decay=0.0,
        warmup_steps=10,
        kv_cache_gb=0.25,
        val_every=10,
        save_every=0,
        gradient_checkpointing=False,
        stage_overrides={
            # the stop rule samples as RL will (temperature 1.0): the format must hold there
            "sft": dict(
                lr=1e-3,
                warmup_steps=20,
                sft_batch=32,
                max_steps=400,
                val_every=25,
                val_temperature=1.0,
                val_top_p=1.0,
                sft_stop_acc=0.3,
                sft_stop_format=0.9,
            ),
            "1": dict(max_steps=30),
            "2": dict(max_steps=30, kl_coef=0.0),
        },
    ),
}


def preset(name: str, **overrides) -> Config:
    """The named run of PAPER.md §7 / Tables 2-3, with `overrides` applied on top."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return Config().replace(**PRESETS[name]).replace(**overrides)
