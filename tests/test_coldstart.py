"""coldstart.py on the tiny model: mixed sampling, every filter counted, a file SFT trains on."""

import json
import os
import subprocess
import sys

import pytest

import coldstart
from data import load_examples, synthetic_task
from octopus import OCTOPUS_SUFFIX, SC, split_response
from rollout import Rollout

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
            out.append([Rollout([1], [0.0], text, "stop")])
        return out


@pytest.mark.slow
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
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
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


@pytest.mark.slow
def test_in_distribution_cli_runs_end_to_end(tiny_path, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    out = tmp_path / "id.jsonl"
    cmd = [sys.executable, os.path.join(ROOT, "coldstart.py"), "--policy", tiny_path, "--in_distribution",
           "--data", "synthetic:2", "--out", str(out), "--samples", "2", "--max_tokens", "8",
           "--o2_max_tokens", "8", "--max_model_len", "512", "--kv_cache_gb", "0.1"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    counts = json.load(open(str(out) + ".counts.json"))
    assert counts["inputs"] == 2 and counts["o1_samples"] == 4
    # the counts describe the file: one o2 asked for per o1 with an answer, one line per row kept
    assert counts["o2_generated"] == counts["o1_with_answer"] <= counts["o1_samples"]
    assert counts["written"] == len(open(out).read().splitlines())


class RecordingEngine:
    """Stands in for VLLMEngine in coldstart.main: records what it is sent and answers every
    prompt with a well-formed, boxed 1."""

    instances: list = []

    def __init__(self, model, **kwargs):
        self.model, self.kwargs, self.calls = model, kwargs, []
        self.max_model_len = min(kwargs["max_model_len"], 1000)
        RecordingEngine.instances.append(self)

    def generate(self, prompts, n, sampling, prefixes=None):
        self.calls.append((prompts, n, sampling))
        text = "<think>\nOne dot.\n</think>\n\n\\boxed{1}"
        return [[Rollout([1], [0.0], text, "stop") for _ in range(n)] for _ in prompts]

    def close(self):
        pass


def run_main(monkeypatch, tmp_path, tiny_path, *flags):
    import rollout

    RecordingEngine.instances = []
    monkeypatch.setattr(rollout, "VLLMEngine", RecordingEngine)
    out = tmp_path / f"cs{len(list(tmp_path.iterdir()))}" / "rows.jsonl"
    counts = coldstart.main(
        ["--policy", tiny_path, "--data", "synthetic:2", "--out", str(out), *flags]
    )
    (engine,) = RecordingEngine.instances
    return engine, counts


def test_o1_prompt_and_sampling_flags(monkeypatch, tmp_path, tiny_path, capsys):
    """The release's o1 sampling is the default (plain prompt, 0.6 / 0.9 / top-k 20, 2048
    tokens; o2 0.7 / 1.0, 4096 tokens); the flags change what the engine is sent."""
    engine, counts = run_main(monkeypatch, tmp_path, tiny_path)
    (o1_prompts, n, o1), (o2_prompts, _, o2) = engine.calls
    assert n == 4 and counts["o1_samples"] == 8 and counts["written"] == 0  # truths are not 1
    assert all(p["prompt"].count(coldstart.PLAIN_SUFFIX) == 1 for p in o1_prompts)
    assert not any(OCTOPUS_SUFFIX.strip() in p["prompt"] for p in o1_prompts)
    assert (o1.temperature, o1.top_p, o1.top_k) == (0.6, 0.9, 20)
    assert (o2.temperature, o2.top_p, o2.top_k) == (0.7, 1.0, 0)
    # the engine's context (1000 here) leaves less than 2048 / 4096 tokens: clamped, one line each
    err = capsys.readouterr().err
    assert "max_tokens 2048 does not fit" in err and "o2_max_tokens 4096 does not fit" in err
    assert o1.max_tokens == o2.max_tokens < 1000
    assert not any(coldstart.PLAIN_SUFFIX in p["prompt"] for p in o2_prompts)
    assert engine.kwargs["max_images"] == 1
    assert (
        engine.kwargs["min_pixels"] == 256 * 28 * 28
        and engine.kwargs["max_pixels"] == 1280 * 28 * 28
    )

    engine, _ = run_main(monkeypatch, tmp_path, tiny_path, "--o1_prompt", "octopus", "--temperature", "1.0",
                         "--top_k", "0", "--max_tokens", "64", "--o2_temperature", "0.3")  # fmt: skip
    (o1_prompts, _, o1), (_, _, o2) = engine.calls
    assert all(p["prompt"].count(OCTOPUS_SUFFIX.strip()) == 1 for p in o1_prompts)
    assert not any(coldstart.PLAIN_SUFFIX in p["prompt"] for p in o1_prompts)
    assert (o1.temperature, o1.top_k, o1.max_tokens, o2.temperature) == (1.0, 0, 64, 0.3)


@pytest.mark.slow
def test_help_exits_0_without_work(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "coldstart.py"), "--help"], env=env,
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)  # fmt: skip
    assert (
        proc.returncode == 0 and "--in_distribution" in proc.stdout and "--o1_prompt" in proc.stdout
    )
    assert "--in-distribution" not in proc.stdout and not list(tmp_path.iterdir())
