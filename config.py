"""One stage's knobs (`Config`), the paper's runs as presets, and train.py's command line.

Every knob of a stage lives in one dataclass with its `--help` text; the runs of arXiv 2602.08503
(Tables 2-3, the experimental setup) and the CPU demo are named presets, and sequences of them
run in one launch (`--preset octopus-8b`: the cold start, Stage I, Stage II). `check_config` is
the one place a Config's choices and batch shape are checked.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import Literal

# The image range of the released inference (256 to 1280 visual tokens of 28 x 28 pixels), the
# default of every stage and of eval.py / coldstart.py.
MIN_PIXELS = 256 * 28 * 28
MAX_PIXELS = 1280 * 28 * 28


def knob(default, help: str):
    """A Config field with its `--help` text (train.py builds one flag per field)."""
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    """Every knob of one training stage of train.py (the cold start, Stage I or Stage II, or a
    baseline). Defaults are the paper's Octopus Stage I on 8 GPUs (arXiv 2602.08503,
    experimental setup); `PRESETS` names the runs of Tables 2-3 and the CPU demo."""

    # what to run
    stage: Literal["sft", "1", "2"] = knob(
        "1",
        'what this stage trains: "sft" (cold start, Sec. 4.1), "1" (Stage I), "2" (Stage II and the baselines), Sec. 4.3',
    )
    model: str = knob(
        "Qwen/Qwen3-VL-8B-Instruct",
        'starting checkpoint (HF folder); "tiny" builds the tiny random Qwen3-VL',
    )
    train_data: str = knob(
        "data/ViRL39K",
        'RL prompts: JSONL / parquet / HF folder (ViRL-39K fields), or "synthetic:N" (dot counting); README "Getting the data"',
    )
    val_data: str = knob(
        "data/geometry3k",
        'validation prompts (Geometry3K test in the paper), same formats ("": no validation)',
    )
    out_dir: str = knob("runs/octopus", "metrics, config, checkpoints and the export go here")
    seed: int = knob(0, "seed of the data order, the engine and the splicing")

    # the method
    reward_kind: Literal["octopus", "baseline"] = knob(
        "octopus",
        '"octopus" (Eq. 6 with the released guards) or "baseline" (0.9 acc + 0.1 fmt of the final answer)',
    )
    prompt_suffix: Literal["octopus", "baseline"] = knob(
        "octopus",
        '"octopus" (asks for a self-correction) or "baseline" (plain): the instruction after each question',
    )
    augment: Literal["paper", "released", "random", "none"] = knob(
        "paper",
        'correction splicing: "paper" (Algorithm 1), "released" (the authors\' quotas), "random", "none"',
    )
    n_rollouts: int = knob(8, "n: rollouts generated per prompt")
    n_train: int = knob(16, "N: samples trained per prompt (2n for Octopus, n for the baselines)")
    canonical_splices: bool = knob(
        True,
        "encode each spliced o1 + SC + o2 as one text, the tokens the model samples (false: parts encoded apart, as the release)",
    )

    # the objective
    ratio: Literal["token", "sequence", "sequence_token"] = knob(
        "sequence_token",
        'importance ratio: "token" (GRPO/DAPO, Eq. 1), "sequence" (GSPO, Eq. 2), "sequence_token" (GSPO-token, the released runs)',
    )
    agg: Literal["seq", "token"] = knob(
        "seq",
        'loss aggregation: "seq" (mean per sequence, then over sequences) or "token" (mean over all tokens)',
    )
    clip_low: float = knob(3e-4, "epsilon_low of the clipped ratio")
    clip_high: float = knob(4e-4, "epsilon_high of the clipped ratio")
    clip_dual: float = knob(3.0, "dual clip: for negative advantages the loss is at most -A x this")
    kl_coef: float = knob(
        0.01, "coefficient of the k3 KL towards the stage's starting model (0: no reference model)"
    )
    kl_tokens: Literal["o1", "response"] = knob(
        "o1",
        'what the KL covers: "o1" (Stage I: the o1 tokens of samples with a correction) or "response" (every response token, the released GRPO script)',
    )

    # batch shape
    prompts_per_step: int = knob(512, "prompts per RL step, all ranks together")
    mini_batch_prompts: int = knob(
        128, "prompts per optimizer step (a step has prompts_per_step / this updates)"
    )
    update_token_budget: int = knob(
        16384, "tokens per micro-batch of the update, per rank (prompts counted once per group)"
    )
    logprob_token_budget: int = knob(
        32768, "tokens per micro-batch of the log-prob passes, per rank"
    )
    packing: Literal["tree", "prompt", "sample"] = knob(
        "tree",
        'how a group is packed for the forward, all exact: "tree" (every shared prefix once: the prompt, a splice\'s o1 + SC), "prompt" (the prompt once), "sample" (a prompt per sample)',
    )
    max_prompt_len: int = knob(
        2048,
        "prompts longer than this (images included) are skipped at load, counted in data_skipped",
    )
    max_response_len: int = knob(
        6144, "tokens sampled per response; spliced samples longer than this are not formed"
    )
    epochs: int = knob(5, "passes over the training prompts")
    max_steps: int = knob(0, "stop after this many steps (0: as many as the epochs give)")

    # optimizer
    lr: float = knob(1e-6, "AdamW learning rate")
    weight_decay: float = knob(0.1, "AdamW weight decay")
    lr_schedule: Literal["constant", "cosine"] = knob(
        "constant", 'after the warm-up: "constant" or "cosine" (to 0 at the last step)'
    )
    warmup_steps: int = knob(10, "linear warm-up steps")
    warmup_ratio: float = knob(
        0.0, "if > 0: warm-up over this share of the steps instead of warmup_steps"
    )
    grad_clip: float = knob(1.0, "gradient-norm clipping")
    max_nonfinite_steps: int = knob(
        5,
        "stop after this many optimizer steps in a row with a NaN/inf gradient norm (each one is "
        "skipped on every rank and counted in skipped_steps; 0: never stop)",
    )
    betas: tuple[float, float] = knob((0.9, 0.999), "AdamW betas")

    # sampling
    temperature: float = knob(1.0, "rollout temperature (also divides the trainer's logits)")
    top_p: float = knob(1.0, "rollout top-p")
    val_temperature: float = knob(0.6, "validation temperature")
    val_top_p: float = knob(0.95, "validation top-p")
    val_n: int = knob(1, "samples per validation prompt")
    val_max_prompts: int = knob(0, "validate on the first this many prompts (0: all)")

    # images (Qwen's 28 x 28 pixels per merged visual token)
    min_pixels: int = knob(MIN_PIXELS, "images smaller than this are scaled up")
    max_pixels: int = knob(MAX_PIXELS, "images larger than this are scaled down")
    max_images: int = knob(
        0, "images per prompt the engine accepts (0: the most any loaded prompt has)"
    )

    # engine
    tensor_parallel: int = knob(1, "vLLM tensor parallelism; only 1 is supported under torchrun")
    gpu_memory_utilization: float = knob(
        0.7,
        "share of GPU memory vLLM may take while awake (0.7: what bench/memory_plan.py leaves "
        "Octopus-8B on 80 GB GPUs with 10%% of the card free)",
    )
    kv_cache_gb: float = knob(1.0, "CPU only: vLLM's KV cache size in GiB")
    enforce_eager: bool = knob(
        False, "GPU: no CUDA graphs in vLLM (the CPU engine is always eager)"
    )

    # SFT (the cold start, Sec. 4.1)
    sft_data: str = knob(
        "data/coldstart.jsonl",
        'cold-start chats (rows with question, images, answer, response: coldstart.py writes them), or "synthetic:N"',
    )
    sft_max_len: int = knob(8192, "response tokens kept per SFT row")
    sft_batch: int = knob(64, "SFT sequences per optimizer step, all ranks together")
    freeze_vision: bool = knob(
        False,
        "train the language model only (the release's cold start freezes the vision tower and merger)",
    )
    sft_stop_acc: float = knob(
        0.0, "stop SFT once sampled validation accuracy reaches this (0: off)"
    )
    sft_stop_format: float = knob(
        0.0, "... and the share of well-formed o1 + SC + o2 responses reaches this (0: off)"
    )

    # bookkeeping
    resume: bool = knob(True, "continue from the newest complete checkpoint in out_dir")
    save_every: int = knob(20, "steps between DCP checkpoints (0: none)")
    keep_checkpoints: int = knob(
        2, "keep only this many newest checkpoints while a stage runs (0: all)"
    )
    keep_finished_checkpoints: bool = knob(
        False,
        "keep a stage's checkpoints once its export and DONE.json are written (false: they are "
        "removed then; one is ~105 GB at 8B, and the next stage starts from the export)",
    )
    val_every: int = knob(10, "steps between validations (0: none)")
    dump_every: int = knob(
        10, "steps between writes of trained groups to out_dir/samples.jsonl (0: none)"
    )
    dump_groups: int = knob(2, "groups written per dump")
    export: bool = knob(True, "write the Hugging Face checkpoint to out_dir/export at the end")
    gradient_checkpointing: bool = knob(
        True, "recompute each layer's activations in the backward (update only)"
    )
    wandb_project: str = knob("", "log metrics to this Weights & Biases project too")

    def replace(self, **changes) -> Config:
        """A copy with `changes`, refusing unknown field names (typos must not pass silently)."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise ValueError(f"unknown Config field(s): {', '.join(unknown)}")
        return dataclasses.replace(self, **changes)

    @property
    def uses_reference(self) -> bool:
        """Whether this stage loads a frozen reference model for a KL term: Stage I's KL on o1
        (Sec. 4.3), or a baseline's KL on every response token (`kl_tokens="response"`). The
        one place this is decided; Stage II and the cold start have none."""
        if self.kl_coef <= 0 or self.stage == "sft":
            return False
        return self.stage == "1" or self.kl_tokens == "response"


# Baselines (Table 2): the plain prompt, the plain reward, no augmentation, N trained = n.
_BASELINE = dict(reward_kind="baseline", prompt_suffix="baseline", augment="none", kl_coef=0.0)
_GSPO = dict(_BASELINE, stage="2")
# GRPO / DAPO: token ratio (Eq. 1), token-mean aggregation, clip 0.2 / 0.28 (the paper's setup).
# "grpo-n16-released" is the released GRPO script (README, "Differences from the release").
# Online filtering and overlong shaping are not built, so DAPO differs from GRPO by its dual clip.
_GRPO = dict(_BASELINE, stage="2", ratio="token", agg="token", clip_low=0.2, clip_high=0.28)
_GRPO_RELEASED = dict(_GRPO, clip_high=0.3, kl_coef=0.01, kl_tokens="response",
                      weight_decay=0.01, warmup_steps=0)  # fmt: skip

# The CPU demo: a tiny Qwen3-VL learns to count dots (cold start until sampled accuracy reaches
# 0.3, then Stage I and Stage II with an RL recipe that learns on 2 cores).
_DEMO = dict(
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
    lr=1e-4,  # higher rates raise the entropy until the format breaks at temperature 1.0
    weight_decay=0.0,
    warmup_steps=10,
    kv_cache_gb=0.25,
    val_every=10,
    save_every=0,
    gradient_checkpointing=False,
)

# The cold start (Sec. 4.1): full fine-tune, lr 1e-6, 8192 tokens, 1 epoch (the paper); the batch,
# the cosine schedule with 3% warm-up and the image size are the release's, on which the paper is
# silent.
_SFT = dict(
    stage="sft",
    lr=1e-6,
    epochs=1,
    sft_batch=128,
    lr_schedule="cosine",
    warmup_ratio=0.03,
    max_pixels=262144,
    weight_decay=0.0,
)

PRESETS: dict[str, dict] = {
    "octopus-8b-stage1": dict(stage="1"),
    "octopus-8b-stage2": dict(stage="2", kl_coef=0.0, model="runs/octopus-stage1/export"),
    "gspo-n8": dict(_GSPO, n_rollouts=8, n_train=8),
    "gspo-n16": dict(_GSPO, n_rollouts=16, n_train=16),
    "grpo-n8": dict(_GRPO, n_rollouts=8, n_train=8),
    "grpo-n16": dict(_GRPO, n_rollouts=16, n_train=16),
    "grpo-n16-released": dict(_GRPO_RELEASED, n_rollouts=16, n_train=16),
    "dapo-n16": dict(_GRPO, n_rollouts=16, n_train=16, clip_dual=10.0),
    # Ablations (Table 3): each changes one thing of the Octopus recipe.
    "ablation-no-augment": dict(stage="1", augment="none", n_train=8),
    "ablation-random-augment": dict(stage="1", augment="random"),
    "ablation-no-stage1": dict(stage="2", kl_coef=0.0),
    "sft": _SFT,
    # Octopus-8B's recipe in one launch (`--preset octopus-8b`, the default): the cold start,
    # Stage I from its export, Stage II from Stage I's (Sec. 4.1, 4.3; experimental setup).
    "octopus-8b-sft": dict(_SFT, out_dir="runs/octopus-8b"),
    # The CPU demo, one preset per stage; `--preset demo` runs the three in sequence.
    "demo-sft": dict(
        _DEMO,
        stage="sft",
        lr=1e-3,
        warmup_steps=20,
        sft_batch=32,
        max_steps=400,
        val_every=25,
        # the stop rule samples as RL will (temperature 1.0): the format must hold there
        val_temperature=1.0,
        val_top_p=1.0,
        sft_stop_acc=0.3,
        sft_stop_format=0.9,
    ),
    "demo-1": dict(_DEMO, stage="1", max_steps=30),
    "demo-2": dict(_DEMO, stage="2", max_steps=30, kl_coef=0.0),
}

# Presets run one after the other in one launch, each stage from the previous stage's export,
# in `out_dir/stage-<stage>` (the first preset's out_dir). "octopus-8b" is train.py's default:
# runs/octopus-8b/stage-sft, stage-1 and stage-2, the last export being Octopus-8B.
SEQUENCES: dict[str, list[str]] = {
    "octopus-8b": ["octopus-8b-sft", "octopus-8b-stage1", "octopus-8b-stage2"],
    "demo": ["demo-sft", "demo-1", "demo-2"],
}


def preset(name: str, **overrides) -> Config:
    """The named run of Tables 2-3 (or the demo's stage), with `overrides` applied on top."""
    if name not in PRESETS:
        known = ", ".join(sorted([*PRESETS, *SEQUENCES]))
        raise ValueError(f"unknown preset {name!r}; known: {known}")
    return Config().replace(**PRESETS[name]).replace(**overrides)


# ---------------------------------------------------------------------------------------------
# Checking a Config, and the command line of train.py
# ---------------------------------------------------------------------------------------------


def choices(name: str) -> tuple[str, ...]:
    """The values a `Literal` field of Config accepts (empty for a free field)."""
    hint = typing.get_type_hints(Config)[name]
    return typing.get_args(hint) if typing.get_origin(hint) is Literal else ()


def check_config(cfg: Config, world: int) -> None:
    """Refuse, before anything is loaded, settings that cannot run: the one place a Config's
    choices and batch shape are checked."""
    for f in dataclasses.fields(Config):
        allowed = choices(f.name)
        if allowed and getattr(cfg, f.name) not in allowed:
            listed = " or ".join(filter(None, [", ".join(allowed[:-1]), allowed[-1]]))
            raise ValueError(f"--{f.name} must be {listed}; got {getattr(cfg, f.name)!r}")
    if cfg.tensor_parallel != 1:
        raise ValueError(
            "--tensor_parallel must be 1: each rank samples its own prompts with its own engine "
            "(vLLM's external launcher would need the same prompts and seed on every rank of a "
            "tensor-parallel group). Qwen3-VL-8B fits one 80 GB GPU with TP 1."
        )
    if cfg.stage == "sft":
        if cfg.sft_batch % world:
            raise ValueError(f"--sft_batch {cfg.sft_batch} must divide by the {world} ranks")
        return
    if cfg.prompts_per_step % cfg.mini_batch_prompts or cfg.mini_batch_prompts % world:
        raise ValueError(
            f"--prompts_per_step {cfg.prompts_per_step} must be a multiple of "
            f"--mini_batch_prompts {cfg.mini_batch_prompts}, itself a multiple of the {world} ranks"
        )


def fit_lengths(cfg: Config, limit: int, log=print) -> Config:
    """`max_prompt_len + max_response_len` cut to the model's context `limit` (the demo's tiny
    model holds 4096 tokens, the paper's settings need 8192), with one `log` line saying so."""
    if cfg.max_prompt_len + cfg.max_response_len <= limit:
        return cfg
    prompt = min(cfg.max_prompt_len, limit // 2)
    fitted = cfg.replace(max_prompt_len=prompt, max_response_len=limit - prompt)
    log(
        f"[{cfg.stage}] max_prompt_len + max_response_len = {cfg.max_prompt_len} + "
        f"{cfg.max_response_len} > {limit}, what {cfg.model} holds: using "
        f"{fitted.max_prompt_len} + {fitted.max_response_len}"
    )
    return fitted


def parse_args(argv: list[str], doc: str = "") -> tuple[str, dict, dict]:
    """`--preset NAME` then any `--field value` of Config (`doc`: the script's docstring, for
    --help). Returns the preset name, the overrides and the command-only flags (`export_only`,
    `dry_run`)."""
    parser = argparse.ArgumentParser(
        description=doc.split("\n\n")[0],
        epilog="\n\n".join(doc.split("\n\n")[1:2]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--preset",
        default="octopus-8b",
        choices=sorted([*PRESETS, *SEQUENCES]),
        help="a named run (Tables 2-3, the demo; octopus-8b: cold start, Stage I, Stage II in "
        "one launch); the flags below override it",
    )
    parser.add_argument(
        "--export_only",
        action="store_true",
        help="export the newest checkpoint of --out_dir to HF format and stop",
    )
    parser.add_argument(
        "--dry_run", action="store_true", help="print the resolved config of every stage and stop"
    )
    for f in dataclasses.fields(Config):
        kind, help_text = type(f.default), f.metadata.get("help", "")
        if kind is bool:
            extra = dict(type=_boolean, metavar="{true,false}")
        elif kind is tuple:
            extra = dict(type=float, nargs=2)
        else:
            extra = dict(type=kind)
        parser.add_argument(f"--{f.name}", default=None, help=help_text, **extra)
    args = vars(parser.parse_args(argv))
    name = args.pop("preset")
    flags = {"export_only": args.pop("export_only"), "dry_run": args.pop("dry_run")}
    overrides = {
        k: (tuple(v) if isinstance(v, list) else v) for k, v in args.items() if v is not None
    }
    return name, overrides, flags


def _boolean(text: str) -> bool:
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def stage_configs(name: str, overrides: dict) -> list[Config]:
    """The Config of each stage a launch runs: one for a preset, several for a sequence (each in
    `out_dir/stage-<stage>`; the model of a later stage is filled in when the earlier ends)."""
    if name not in SEQUENCES:
        return [preset(name, **overrides)]
    stages = [preset(p, **overrides) for p in SEQUENCES[name]]
    root = stages[0].out_dir
    stages = [c.replace(out_dir=os.path.join(root, f"stage-{c.stage}")) for c in stages]
    # each later stage starts from the export of the one before (train.run_sequence passes it on)
    return stages[:1] + [
        c.replace(model=os.path.join(prev.out_dir, "export"))
        for prev, c in zip(stages, stages[1:], strict=False)
    ]
