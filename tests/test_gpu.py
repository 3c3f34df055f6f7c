"""The GPU-only paths, checked on a GPU node in a few minutes (README: "Checking a GPU node"):

    .venv/bin/python -m pytest -q tests/test_gpu.py

Skipped without CUDA. On 1 GPU (2 when there are two or more), tiny model, bf16: every stage
runs 2 steps with the engine asleep during the updates; save, stop, resume; with vLLM, each
sleep frees the same memory every step; at lr 0 the first mini-batch's ratio is exactly 1 and
the engine/trainer log-prob gap stays flat; an engine synced with stale weights shows in the gap
(the stale-engine monitor works); bf16 and float32 gradients of the same items agree; the packed
attention equals per-sample forwards on CUDA in float32 (memory-efficient kernel) and bf16
(flash kernel), log-probs and gradients, and so does the token tree of Octopus groups
(packing.py). With vLLM installed the engine is vLLM with sleep mode and CUDA graphs
(`--enforce_eager false`, the default), and the report must say so; without it, the
transformers stand-in of tests/hf_engine.py, and the sleep-memory check is skipped (moving the
tiny model frees nothing measurable). Every engine takes at most 0.2 of a card.
"""

import importlib.util
import json
import os
import statistics
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ON_CPU = os.environ.get("OCTOPUS_GPU_CHECKS_ON_CPU") == "1"  # exercise the harness only

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (torch.cuda.is_available() or ON_CPU), reason="needs a CUDA GPU"),
]


@pytest.fixture(scope="module")
def report(tiny_path, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("gpu")
    nproc = min(torch.cuda.device_count(), 2) if torch.cuda.is_available() else 1
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           os.path.join(ROOT, "tests", "torchrun_gpu.py"), str(out), tiny_path]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-6000:])
    return json.loads((out / "report.json").read_text())


def test_every_stage_runs_in_bf16_with_finite_metrics(report):
    for name, steps in (("demo-sft", 2), ("demo-1", 2), ("demo-2", 2)):
        got = report[f"{name}_rows"]
        assert [r["step"] for r in got] == list(range(1, steps + 1))
        for r in got:
            assert all(
                v == v and abs(v) != float("inf") for v in r.values() if isinstance(v, float)
            )
    assert all(r["engine_asleep"] == 1.0 for r in report["demo-sft_rows"])


def test_resume_continues_from_the_checkpoint(report):
    assert report["resumed_steps"] == [1, 2, 3]


def test_the_engine_is_vllm_where_it_is_installed(report):
    has_vllm = importlib.util.find_spec("vllm") is not None
    assert report["engine"] == ("vllm" if has_vllm else "transformers stand-in")


@pytest.mark.skipif(ON_CPU, reason="GPU memory only")
def test_sleep_frees_the_same_memory_every_step(report):
    if report["engine"] != "vllm":
        pytest.skip("the stand-in's sleep moves a ~1M-parameter model: nothing measurable")
    freed = report["sleep_freed_gib"]
    assert len(freed) >= 4 and min(freed) > 0.05, freed  # weights and KV cache handed back
    assert max(freed) - min(freed) < 0.1 * statistics.median(freed), freed  # no leak, no creep


def test_lr_0_is_exactly_on_policy_and_the_gap_is_flat(report):
    rows = report["lr0_rows"]
    assert all(r["ratio"] == 1.0 and r["clip_low"] == 0.0 and r["clip_high"] == 0.0 for r in rows)
    gaps = [r["logprob_gap"] for r in rows]
    # bf16 engine vs trainer: ~1e-2 per token, the same every step at the same weights
    assert max(gaps) < 0.1 and max(gaps) - min(gaps) < 0.5 * max(statistics.mean(gaps), 1e-3), gaps


def test_a_stale_engine_shows_in_the_gap(report):
    gaps = [r["logprob_gap"] for r in report["stale_rows"]]
    assert gaps[-1] > 2 * gaps[0] and gaps[-1] > 0.05, gaps


def test_bf16_gradients_agree_with_float32(report):
    assert report["grad_cosine_bf16_fp32"] > 0.99


def test_packed_attention_equals_per_sample_forwards_under_the_gpu_kernels(report):
    got = report["packed_vs_per_sample"]
    fp32 = got["torch.float32"]
    assert fp32["max_gap"] < 1e-4 and fp32["grad_rel_err"] < 1e-4, fp32
    if not torch.cuda.is_available():
        return  # the harness only: CPU has neither kernel
    assert fp32["lower_right_kernels"] == ["efficient"], fp32  # flash has no float32
    bf16 = got["torch.bfloat16"]
    assert bf16["lower_right_kernels"] == ["flash"], bf16
    # bf16: packing may not add error beyond bf16's own (measured against float32 per-sample)
    assert bf16["packed_err"] < 2 * bf16["per_sample_err"] + 1e-2, bf16
    assert bf16["grad_cosine"] > 0.99, bf16


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tree_packing_equals_per_sample_forwards_under_the_gpu_kernels(tiny_path, processor, dtype):
    """The token tree (packing.py) against plain per-sample forwards on CUDA, every node's
    attention forced onto the kernel training uses (float32: memory-efficient, bf16: flash; a
    kernel that cannot take an input raises instead of falling back): two Octopus groups with
    splices, a re-encoded boundary and duplicates, log-probs and the gradient of a weighted sum.
    bf16 is held to float32 per-sample as the truth: the tree may add no error beyond bf16's own."""
    from test_packing import groups_for, octopus_group
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from transformers import Qwen3VLForConditionalGeneration

    import packing

    if dtype == "bfloat16" and not torch.cuda.is_available():
        pytest.skip("bf16 against float32 on CUDA only")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    prompts = [p for p, _ in groups_for(processor, True, (1, 1), seed=5)]
    groups = [
        (p, octopus_group(processor, seed=s)[0]) for p, s in zip(prompts, (0, 1), strict=True)
    ]
    sdpa = packing.F

    class Forced:  # packing's `F` with every packed attention under one kernel
        def __init__(self, backend):
            self.backend = backend

        def scaled_dot_product_attention(self, *args, **kwargs):
            if self.backend is None:
                return sdpa.scaled_dot_product_attention(*args, **kwargs)
            with sdpa_kernel(self.backend):
                return sdpa.scaled_dot_product_attention(*args, **kwargs)

    def per_sample(model, prompt, response):
        ids = torch.cat([prompt["input_ids"], torch.tensor([response])], dim=1).to(device)
        types = torch.cat([prompt["mm_token_type_ids"], torch.zeros(1, len(response), dtype=torch.long)],
                          1).to(device)  # fmt: skip
        extra = {k: prompt[k].to(device) for k in ("pixel_values", "image_grid_thw") if k in prompt}
        logits = model(input_ids=ids, mm_token_type_ids=types, **extra).logits[0]  # (P + n, V)
        logp = torch.log_softmax(logits[prompt["input_ids"].shape[1] - 1 : -1].float(), -1)
        return logp.gather(-1, torch.tensor(response, device=device)[:, None])[:, 0]  # (n,)

    def run(model, tree: bool):
        model.zero_grad(set_to_none=True)
        if tree:
            packed = packing.pack(groups, model.model.get_rope_index, "tree", min_saved=0)
            assert packed.gather is not None  # the groups do share beyond the prompt
            logps = packing.response_logprobs(model, packed, device)
        else:
            logps = [per_sample(model, p, r) for p, rs in groups for r in rs]
        flat = torch.cat(logps).float()
        (flat * torch.linspace(-1.0, 1.0, len(flat), device=device)).sum().backward()
        grads = torch.cat(
            [p.grad.flatten().float() for p in model.parameters() if p.grad is not None]
        )
        return flat.detach(), grads

    results = {}
    for name in ("float32", dtype):
        torch_dtype = getattr(torch, name)
        model = Qwen3VLForConditionalGeneration.from_pretrained(tiny_path, dtype=torch_dtype)
        model = model.to(device).train()
        packing.use_packed_attention(model)
        kernel = {"float32": SDPBackend.EFFICIENT_ATTENTION, "bfloat16": SDPBackend.FLASH_ATTENTION}
        packing.F = Forced(kernel[name] if device.type == "cuda" else None)
        try:
            results[name] = (run(model, tree=True), run(model, tree=False))
        finally:
            packing.F = sdpa
    (tree_lp, tree_grad), (sample_lp, sample_grad) = results[dtype]
    truth = results["float32"][1][0]
    if dtype == "float32":
        assert (tree_lp - sample_lp).abs().max() < 1e-4
        assert (tree_grad - sample_grad).abs().max() < 1e-4 * sample_grad.abs().max()
    else:
        tree_err = (tree_lp - truth).abs().max()
        assert tree_err < 2 * (sample_lp - truth).abs().max() + 1e-2, tree_err
        assert torch.nn.functional.cosine_similarity(tree_grad, sample_grad, dim=0) > 0.99
