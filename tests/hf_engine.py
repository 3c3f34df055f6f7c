"""A stand-in for rollout.VLLMEngine built on transformers' `generate`, for GPU checks on a
machine without vLLM (the same interface: generate / sync_weights / sleep / wake / close).

Slow and simple: one un-sharded copy of the model per rank, moved to the CPU while asleep (so
a sleep frees its GPU memory as vLLM's does, though too little to measure on the tiny
model). Its sleep keeps the weights (vLLM's level 2 discards them): a sync always follows in the
trainer anyway. Never used by the trainer itself.
"""

from __future__ import annotations

import torch

from rollout import FORBIDDEN_TOKENS, Rollout, checkpoint_name


class HFEngine:
    def __init__(self, model_path: str, device: torch.device, *, max_model_len: int = 4096) -> None:
        from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

        self.device = device
        self.processor = AutoProcessor.from_pretrained(model_path)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.dtype = dtype  # what sync_weights should be sent in (rollout.VLLMEngine's)
        self.model = Qwen3VLForConditionalGeneration.from_pretrained(model_path, dtype=dtype)
        self.model.to(device).eval()
        self.max_model_len = max_model_len
        self.image_size = None
        self.sleeping: set[str] = set()
        vocab = self.processor.tokenizer.get_vocab()
        self.forbidden = [[vocab[t]] for t in FORBIDDEN_TOKENS if t in vocab]

    @property
    def asleep(self) -> bool:
        return bool(self.sleeping)

    @torch.no_grad()
    def generate(
        self, prompts, n, sampling, *, prefixes=None, image_size=None
    ) -> list[list[Rollout]]:
        if self.asleep:
            raise RuntimeError("generate() while the engine sleeps")
        tok = self.processor.tokenizer
        eos = tok.convert_tokens_to_ids("<|im_end|>")
        groups = []
        for k, p in enumerate(prompts):
            text = p["prompt"] + (prefixes[k] if prefixes else "")
            size = {"size": dict(image_size)} if image_size and p["images"] else {}
            inputs = self.processor(text=[text], images=p["images"] or None, return_tensors="pt",
                                    **size)  # fmt: skip
            inputs = {key: v.to(self.device) for key, v in inputs.items()}
            n_prompt = inputs["input_ids"].shape[1]
            group = []
            for _ in range(n):
                out = self.model.generate(
                    **inputs,
                    do_sample=sampling.temperature > 0,
                    temperature=max(sampling.temperature, 1e-5),
                    top_p=sampling.top_p,
                    max_new_tokens=sampling.max_tokens,
                    eos_token_id=eos,
                    pad_token_id=tok.pad_token_id,
                    bad_words_ids=self.forbidden,
                    output_scores=True,
                    return_dict_in_generate=True,
                )
                ids = out.sequences[0, n_prompt:].tolist()
                scores = torch.stack(out.scores)[:, 0].float()  # (n_new, V), processed logits
                logp = torch.log_softmax(scores, -1).gather(
                    -1, torch.tensor(ids, device=scores.device)[:, None]
                )
                stop = "stop" if ids and ids[-1] == eos else "length"
                group.append(Rollout(ids, logp[:, 0].tolist(), tok.decode(ids), stop))
            groups.append(group)
        return groups

    def sync_weights(self, named_tensors) -> None:
        state = {checkpoint_name(k): v for k, v in named_tensors}
        self.model.load_state_dict(state, strict=True)

    def sleep(self) -> None:
        if not self.asleep:
            self.model.to("cpu")
            self.sleeping = {"weights", "kv_cache"}

    def wake(self, tags=None) -> None:
        waking = set(self.sleeping if tags is None else tags) & self.sleeping
        if "weights" in waking:
            self.model.to(self.device)
        self.sleeping -= waking

    def close(self) -> None:
        del self.model
