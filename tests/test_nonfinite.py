"""A non-finite gradient norm skips the optimizer step on every rank; the bf16 weight gather;
the HF export's dtype and KV-cache flag. Two gloo ranks on the tiny model
(tests/torchrun_nonfinite.py)."""

import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reports(tiny_path, tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("nonfinite")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "tests", "torchrun_nonfinite.py"), str(out), tiny_path]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-6000:])
    got = [json.loads((out / f"report_rank{r}.json").read_text()) for r in (0, 1)]
    for r in got:
        r["out"] = str(out)
    return got


def test_a_nan_in_one_ranks_gradient_skips_the_step_on_every_rank(reports):
    for r in reports:
        clean, poisoned, again = r["rl_steps"]
        # a clean step moves the weights (the check below could not pass by doing nothing)
        assert clean["skipped"] == 0.0 and not clean["weights_unchanged"] and clean["finite"]
        # rank 0's own gradient was finite, yet it skips too: the decision is global
        assert poisoned["skipped"] == 1.0 and not poisoned["grad_norm_finite"]
        assert poisoned["weights_unchanged"] and poisoned["moments_unchanged"]
        assert poisoned["finite"] and poisoned["grads_freed"]
        assert poisoned["row_skipped"] == 1.0 and poisoned["in_a_row"] == 1
        assert again["skipped"] == 0.0 and not again["weights_unchanged"] and again["finite"]
        assert again["in_a_row"] == 0 and again["row_skipped"] == 0.0


def test_max_nonfinite_steps_in_a_row_stop_the_run_with_a_clear_error(reports):
    for r in reports:
        first, second, third = r["limit_errors"]
        assert first is None and second is None  # skipped, counted, not yet stopped
        assert "3 optimizer steps in a row" in third and "--max_nonfinite_steps 3" in third
        assert r["finite_after_limit"]


def test_a_poisoned_sft_sample_skips_the_step_but_the_schedule_advances(reports):
    for r in reports:
        poisoned, clean = r["sft_steps"]
        assert poisoned["skipped"] == 1.0 and poisoned["weights_unchanged"]
        assert clean["skipped"] == 0.0 and not clean["weights_unchanged"]
        # warm-up of 2 steps at lr 1e-3: (s + 1) / 3 after scheduler step s, skipped or not
        assert poisoned["lr"] == pytest.approx(2e-3 / 3) and clean["lr"] == pytest.approx(1e-3)


def test_the_weights_are_gathered_in_the_engines_dtype(reports):
    for r in reports:
        assert r["gather_dtypes"] == ["torch.bfloat16"]  # cast before the all-gather
        assert r["gather_equal_rounded"]  # what vLLM's loader would round to anyway


def test_the_export_has_the_training_dtype_and_the_kv_cache_on(reports):
    from safetensors.torch import load_file
    from transformers import AutoConfig, Qwen3VLForConditionalGeneration

    out = reports[0]["out"]
    for name, dtype in (("export-fp32", torch.float32), ("export-bf16", torch.bfloat16)):
        path = os.path.join(out, name)
        saved = json.load(open(os.path.join(path, "config.json")))
        # training stores use_cache=False at the top (fsdp.load_model); the export must not
        assert saved["use_cache"] is True and saved["text_config"]["use_cache"] is True
        name_of = str(dtype).split(".")[1]
        assert saved["dtype"] == saved["text_config"]["dtype"] == name_of
        assert AutoConfig.from_pretrained(path).text_config.use_cache is True
        tensors = load_file(os.path.join(path, "model.safetensors"))
        assert {v.dtype for v in tensors.values() if v.is_floating_point()} == {dtype}
        model = Qwen3VLForConditionalGeneration.from_pretrained(path, dtype="auto")
        assert model.dtype == dtype
        gen = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2, do_sample=False,
                             return_dict_in_generate=True)  # fmt: skip
        assert gen.past_key_values is not None  # a user's generate runs with the KV cache
    assert all(r["training_use_cache"] is False for r in reports)  # training keeps it off
