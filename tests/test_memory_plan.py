"""bench/memory_plan.py: parameter counts equal the real Qwen3-VL's, the packed micro-batch and
the logits terms by hand, the logits terms against a measurement, and the flags that move the
plan."""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from config import preset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "memory_plan.py")
_spec = importlib.util.spec_from_file_location("memory_plan", SCRIPT)
mp = importlib.util.module_from_spec(_spec)
sys.modules["memory_plan"] = mp  # dataclasses look their module up there
_spec.loader.exec_module(mp)
_spec = importlib.util.spec_from_file_location("memory_check", SCRIPT.replace("plan", "check"))
mc = importlib.util.module_from_spec(_spec)  # the --check measurements, which import mp
_spec.loader.exec_module(mc)


def _odd_config() -> dict:
    """Not the 8B: tied embeddings, other head counts and widths, 2 DeepStack mergers."""
    return {
        "text_config": {
            "hidden_size": 96,
            "num_hidden_layers": 3,
            "intermediate_size": 160,
            "num_attention_heads": 6,
            "num_key_value_heads": 2,
            "head_dim": 32,
            "vocab_size": 1000,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1e4,
                "mrope_section": [6, 5, 5],
                "mrope_interleaved": True,
            },
            "tie_word_embeddings": True,
        },
        "vision_config": {
            "depth": 4,
            "hidden_size": 48,
            "intermediate_size": 80,
            "num_heads": 4,
            "patch_size": 14,
            "temporal_patch_size": 2,
            "spatial_merge_size": 2,
            "out_hidden_size": 96,
            "deepstack_visual_indexes": [1, 2],
            "num_position_embeddings": 64,
            "in_channels": 3,
        },
        "tie_word_embeddings": True,
    }


@pytest.mark.parametrize("config", [mp.QWEN3_VL_8B, _odd_config()], ids=["8b", "odd"])
def test_param_counts_equal_the_model(config):
    """Per FSDP unit of fsdp.load_model, counted on the model transformers builds (meta)."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    with torch.device("meta"):
        model = Qwen3VLForConditionalGeneration._from_config(Qwen3VLConfig(**config))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    visual, text = model.model.visual, model.model.language_model
    got = mp.param_counts(mp.shape_of(config))
    assert got["decoder_layer"] == count(text.layers[0])
    assert got["vision_block"] == count(visual.blocks[0])
    assert got["vision_root"] == count(visual) - sum(count(b) for b in visual.blocks)
    assert got["total"] == count(model)
    assert got["root"] == count(model) - count(visual) - sum(count(x) for x in text.layers)


def test_8b_has_the_published_size():
    assert round(mp.param_counts(mp.shape_of(mp.QWEN3_VL_8B))["total"] / 1e9, 2) == 8.77


def test_packed_micro_batch_by_hand():
    # the paper's update: a 2048-token prompt (1280 visual tokens), responses of 6144
    mb = mp.packed_micro_batch(16384, 2048, 1280, 6144, n_train=16)
    assert mb == mp.MicroBatch(
        tokens=16384, responses=14336, kv_rows=3 * 2048 + 14336, patches=5120
    )
    # n_train closes a chunk: [10 | 20 20] [10 | 20 20]
    assert mp.packed_micro_batch(100, 10, 0, 20, n_train=2) == mp.MicroBatch(100, 80, 120, 0)
    with pytest.raises(ValueError, match="no room"):
        mp.packed_micro_batch(100, 100, 0, 20, n_train=2)


def test_logits_terms_by_hand():
    # V = 10, T = 3000: two chunks (2048 + 952); bf16 logits, float32 chunk copies
    assert mp.logprob_logits_terms(10, 3000, 2) == 3000 * 10 * 2 + 2048 * 10 * (4 + 4)
    assert mp.logprob_logits_terms(10, 3000, 4) == 3000 * 10 * 4 + 2048 * 10 * 4  # no copy
    u = mp.update_logits_terms(10, 4, 3000, 2)
    assert u["backward, log-prob chunk"] == 60000 + 952 * 10 * 2 + 2048 * 10 * (4 + 12)
    assert u["backward, logits gradient"] == 2 * 60000
    assert u["backward, LM head"] == 60000 + 3000 * 4 * 2


@pytest.mark.slow  # a 3000 x 32000 logits forward and backward
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="Linux peak RSS")
def test_logits_terms_match_a_measurement():
    """loss.token_logprobs behind a linear head, forward + backward over two chunks: the peak
    resident memory is the plan's within 20% (tensors >= 32 MB, which malloc maps and unmaps)."""
    import torch.nn.functional as F

    from loss import token_logprobs

    V, H, T = 32000, 64, 3000
    weight = torch.randn(V, H) * 0.02
    hidden = torch.randn(1, T, H)
    labels = torch.randint(0, V, (T,))

    def update():
        h = hidden.clone().requires_grad_()
        token_logprobs(F.linear(h, weight)[0], labels).sum().backward()

    measured = mc.measure(update)
    planned = T * H * 4 + max(mp.update_logits_terms(V, H, T, 4).values())
    assert 0.8 <= planned / measured <= 1.2, (planned, measured)


def _total(phases, prefix):
    return next(p.total for p in phases if p.name.startswith(prefix))


def test_flags_move_the_plan():
    inputs = mp.PlanInputs(prompt_len=2048, image_tokens=1280, gpus=8, gpu_gb=80)
    cfg = preset("octopus-8b-stage1")
    base, notes = mp.plan(cfg, inputs)
    half, _ = mp.plan(cfg.replace(update_token_budget=8192), inputs)
    assert _total(half, "update, micro") < _total(base, "update, micro")
    assert _total(half, "generate") == _total(base, "generate")
    more, _ = mp.plan(cfg.replace(gpu_memory_utilization=cfg.gpu_memory_utilization + 0.1), inputs)
    assert _total(more, "generate") == pytest.approx(_total(base, "generate") + 0.1 * 79.1)
    no_ref, no_ref_notes = mp.plan(cfg.replace(kl_coef=0.0), inputs)
    assert notes["reference"] and not no_ref_notes["reference"]
    assert [p.name for p in no_ref].count("log-probs, reference micro-batch") == 0
    wide, _ = mp.plan(cfg, mp.PlanInputs(2048, 1280, gpus=16, gpu_gb=80))
    opt = lambda ph: sum(g for w, g in ph if "shards" in w or "AdamW" in w)  # noqa: E731
    step = next(p for p in base if p.name == "update, optimizer step").parts
    step16 = next(p for p in wide if p.name == "update, optimizer step").parts
    assert opt(step16) == pytest.approx(opt(step) / 2)


def test_command_line(capsys):
    assert mp.main([]) == 0
    out = capsys.readouterr().out
    assert "| update, micro-batch fwd+bwd |" in out and "Assumptions:" in out
    help_run = subprocess.run([sys.executable, SCRIPT, "--help"], capture_output=True, text=True)
    assert help_run.returncode == 0 and "--check" in help_run.stdout


def test_the_plan_is_the_codes_engine():
    """Sleep level, sync dtype and the utilization default the plan assumes are the code's."""
    import types

    import rollout
    import train
    from config import Config

    assert mp.SLEEP_LEVEL == rollout.SLEEP_LEVEL == 2
    # train.sync_engine sends each tensor in the engine's dtype (bf16 on GPUs), not float32
    sent = []
    engine = types.SimpleNamespace(dtype=torch.bfloat16, wake=lambda tags=None: None,
                                   sync_weights=lambda named: sent.extend(v.dtype for _, v in named))  # fmt: skip
    train.sync_engine(types.SimpleNamespace(model=torch.nn.Linear(3, 2), engine=engine))
    assert sent == [torch.bfloat16] * 2 and mp.SYNC_BYTES == torch.bfloat16.itemsize
    inputs = mp.PlanInputs(prompt_len=2048, image_tokens=1280, gpus=8, gpu_gb=80)
    phases, _ = mp.plan(preset("octopus-8b-stage1"), inputs)
    sync = dict(next(p for p in phases if p.name.startswith("weight sync")).parts)
    vocab = 151936 * 4096  # the embeddings, the largest tensor: sent in bf16, copied in bf16
    assert sync["largest full tensor bf16 + vLLM's bf16 copy"] == pytest.approx(4 * vocab / mp.GIB)
    # the default is the plan's: the largest share leaving 10% of an 80 GB card free, Stage I
    default = Config().gpu_memory_utilization
    assert mp.max_utilization(preset("octopus-8b-stage1"), inputs) == default == 0.7
    best = mp.max_utilization(preset("octopus-8b-stage1", gpu_memory_utilization=default), inputs)
    planned, _ = mp.plan(preset("octopus-8b-stage1", gpu_memory_utilization=best + 0.05), inputs)
    assert _total(planned, "generate") > 0.9 * 79.1 >= _total(phases, "generate")
    assert mp.max_utilization(preset("octopus-8b-stage2"), inputs) >= default  # no reference
