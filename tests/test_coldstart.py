"""coldstart.py on the tiny model: mixed sampling, every filter counted, a file SFT trains on."""

import json
import os
import subprocess
import sys

import pytest

import coldstart
from data import load_examples, synthetic_task
from octopus import SC, split_response
from rollout import Generation

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ScriptedStrong:
    """Stands in for the 30B model we cannot run here: answers each strong prompt from its
    text: right for even examples, wrong for odd ones, and once malformed."""

    def __init__(self):
        self.prompts = []

    def generate(self, prompts, n, sampling, prefixes=None):
        self.prompts += prompts
        out = []
        for k, p in enumerate(prompts):
            truth = p["prompt"].split("The correct final answer is ")[1].split(".")[0]
            guess = truth if k % 2 == 0 else str(int(truth) + 1)
            text = f"<think>\nCounting carefully.\n</think>\n\n\\boxed{{{guess}}}"
            if k == 2:
                text = f"no think tags \\boxed{{{truth}}}"
            out.append([Generation([1], [0.0], text, "stop")])
        return out


def test_mixed_sampling_filters_and_writes_sft_rows(engine, processor, tiny_path, tmp_path):
    from rollout import Sampling

    examples = synthetic_task(3, seed=4)
    out = tmp_path / "cs" / "coldstart.jsonl"
    os.makedirs(out.parent)
    strong = ScriptedStrong()
    # the random tiny policy rarely writes a box; force one so o1 candidates exist
    policy = _BoxingPolicy(engine)
    counts = coldstart.build(policy, strong, processor, examples, samples=4,
                             sampling=Sampling(max_tokens=8), out=str(out))  # fmt: skip
    assert counts["inputs"] == 3 and counts["o1_samples"] == 12 and counts["o1_with_answer"] == 12
    assert counts["o2_generated"] == 12
    assert counts["o2_well_formed"] == 11  # one malformed o2 dropped
    assert counts["o2_correct"] == counts["written"] == 5  # evens right, minus the malformed one
    # the strong model saw the question, the ground truth and o1, and the paper's instructions
    first = strong.prompts[0]["prompt"]
    assert "How many dots are in the image?" in first and "Reference answer:" in first
    assert "never mention the reference answer" in first and "<|image_pad|>" in first
    assert "You first think through your reasoning process" not in first  # no Octopus suffix
    rows, report = load_examples(str(out))
    assert report.kept == 5 and not report.skipped
    for r in rows:
        o1, o2 = split_response(r["response"])
        assert o2 is not None and r["response"] == o1 + SC + o2
        assert r["messages"][0]["content"][0]["type"] == "image"
    # train.py's SFT stage trains on the file
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "--master_port", "29777",
           os.path.join(ROOT, "train.py"), "--preset", "sft", "--model", tiny_path,
           "--sft_data", str(out), "--out_dir", str(tmp_path / "sft"), "--sft_batch", "2", "--max_steps", "2",
           "--lr", "1e-4", "--kv_cache_gb", "0.1", "--max_prompt_len", "384", "--max_response_len", "64",
           "--save_every", "0", "--val_every", "0"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    metrics = [json.loads(line) for line in open(tmp_path / "sft" / "metrics.jsonl")]
    assert [m["step"] for m in metrics] == [1, 2] and all(m["sft_loss"] > 0 for m in metrics)


class _BoxingPolicy:
    """The real engine's samples, each closed with a box (the random tiny model seldom boxes)."""

    def __init__(self, engine):
        self.engine = engine

    def generate(self, prompts, n, sampling, prefixes=None):
        groups = self.engine.generate(prompts, n, sampling)
        for group in groups:
            for k, g in enumerate(group):
                g.text = f"<think>{g.text}</think>\\boxed{{{k + 1}}}"
        return groups


def test_in_distribution_cli_runs_end_to_end(tiny_path, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    out = tmp_path / "id.jsonl"
    cmd = [sys.executable, os.path.join(ROOT, "coldstart.py"), "--policy", tiny_path, "--in-distribution",
           "--data", "synthetic:2", "--out", str(out), "--samples", "2", "--max-tokens", "8",
           "--max-model-len", "512", "--kv-cache-gb", "0.1"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    counts = json.load(open(str(out) + ".counts.json"))
    assert counts["inputs"] == 2 and counts["o1_samples"] == 4
    assert (
        counts["written"]
        <= counts["o2_correct"]
        <= counts["o2_well_formed"]
        <= counts["o2_generated"]
    )
