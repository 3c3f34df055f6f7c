"""A launch on a real cluster: a relaunch continues, a stop signal saves and exits, a finished
stage's checkpoints go, two torchrun agents (two "nodes") train, save and resume; and a rank
short of micro-batches pays a dummy pass, not a real one. 2 gloo ranks on the tiny model
(tests/torchrun_relaunch.py: train.py's own `main` on a 2-step cold start and a 3-step Stage I)."""

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import fsdp
import train
from config import preset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELPER = os.path.join(ROOT, "tests", "torchrun_relaunch.py")
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, VLLM_ENABLE_V1_MULTIPROCESSING="0")


def torchrun(agent: list[str], *args: str) -> subprocess.Popen:
    """One torchrun agent running the helper, in a session of its own (so a test can signal
    its processes and nothing else)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", *agent, HELPER, *args]
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)  # fmt: skip


def finish(procs: list[subprocess.Popen], check: bool = True) -> str:
    logs = [p.communicate(timeout=600)[0] for p in procs]
    if check and any(p.returncode for p in procs):
        pytest.fail("\n".join(log[-4000:] for log in logs))
    return "\n".join(logs)


def single(out, tiny, *flags) -> subprocess.Popen:
    """2 ranks under one agent (one node)."""
    return torchrun(["--standalone", "--nproc_per_node=2"], tiny, "--out_dir", str(out), *flags)


def two_agents(out, tiny, *flags) -> list[subprocess.Popen]:
    """Two agents of one rank each meeting in a c10d rendezvous on localhost: two nodes."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    agent = ["--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d",
             f"--rdzv_endpoint=localhost:{port}", f"--rdzv_id={os.path.basename(out)}"]  # fmt: skip
    return [torchrun(agent, tiny, "--out_dir", str(out), *flags) for _ in range(2)]


def processes_of(pid: int) -> list[int]:
    """The agent and its workers (torchrun starts each worker in a session of its own)."""
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [pid, *map(int, f.read().split())]


def rows(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def snapshot(folder) -> dict[str, tuple]:
    """Every file under `folder`: size, modification time (ns) and content hash."""
    out = {}
    for base, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(base, name)
            with open(path, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
            out[os.path.relpath(path, folder)] = (os.path.getsize(path), os.stat(path).st_mtime_ns,
                                                  digest)  # fmt: skip
    return out


def weights(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "export", "model.safetensors"))


def equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def sequence(tiny_path, tmp_path_factory):
    """The cold start and Stage I in one launch, SIGTERM to every process once Stage I logged a
    step; the same command again on two agents (two nodes: it continues); and once more on one
    (it is finished)."""
    out = tmp_path_factory.mktemp("relaunch") / "run"
    launch = ("--preset", "relaunch")
    proc = single(out, tiny_path, *launch)
    metrics = out / "stage-1" / "metrics.jsonl"
    while proc.poll() is None and not (metrics.exists() and metrics.read_text().count("\n")):
        time.sleep(0.05)
    for pid in processes_of(proc.pid):  # as a scheduler does: the agent and every rank
        os.kill(pid, signal.SIGTERM)
    stopped = finish([proc], check=False)
    report = {"stopped": stopped, "stopped_rows": rows(metrics)}
    report["stopped_checkpoints"] = sorted(os.listdir(out / "stage-1" / "checkpoints"))
    report["stopped_done"] = (out / "stage-1" / "DONE.json").exists()
    sft_before = snapshot(out / "stage-sft")
    report["resumed"] = finish(two_agents(out, tiny_path, *launch))
    report["sft_unchanged"] = snapshot(out / "stage-sft") == sft_before
    before = snapshot(out)
    report["again"] = finish([single(out, tiny_path, *launch)])
    report["again_unchanged"] = snapshot(out) == before
    # a crash after the cold start's last checkpoint, before its export and DONE.json
    sft = out / "stage-sft"
    report["sft_export"] = weights(sft)
    shutil.rmtree(sft / "export")
    os.remove(sft / "DONE.json")
    report["crashed"] = finish([single(out, tiny_path, *launch)])
    return out, report


@pytest.fixture(scope="module")
def full(sequence, tiny_path):
    """Stage I from the sequence's cold start, uninterrupted, on two agents that checkpoint
    every step and keep them: the run the stopped one must end equal to."""
    out, _ = sequence
    full = out.parent / "two-agents"
    flags = ("--preset", "relaunch-1", "--model", str(out / "stage-sft" / "export"))
    log = finish(two_agents(full, tiny_path, *flags, "--save_every", "1",
                            "--keep_finished_checkpoints", "true"))  # fmt: skip
    return full, log


@pytest.mark.slow
def test_sigterm_saves_at_a_step_and_the_relaunch_ends_as_an_uninterrupted_run(sequence, full):
    out, r = sequence
    full, _ = full
    # stopped mid-stage: after step k of 3, with the checkpoint of step k and no completion mark
    k = len(r["stopped_rows"])
    assert 1 <= k < 3 and not r["stopped_done"], r["stopped"][-3000:]
    assert r["stopped_checkpoints"] == [f"step_{k:06d}"]
    assert f"SIGTERM: every rank stopped after step {k}" in r["stopped"]
    # the relaunch (on two agents) resumed at step k: every step logged once, none redone
    assert f"(step {k})" in r["resumed"] and "[1] resumed from" in r["resumed"]
    assert [x["step"] for x in rows(out / "stage-1" / "metrics.jsonl")] == [1, 2, 3]
    # and ends with the weights of the uninterrupted run
    got, reference = weights(out / "stage-1"), weights(full)
    assert equal(got, reference) and not equal(got, weights(out / "stage-sft"))


@pytest.mark.slow
def test_a_relaunch_skips_finished_stages_and_a_finished_launch_changes_nothing(sequence):
    out, r = sequence
    # stopped in its last stage: the relaunch left the cold start's files as they were
    assert "[sft] finished before (2 steps" in r["resumed"] and r["sft_unchanged"]
    assert "[sft] resumed" not in r["resumed"]
    # the whole sequence finished: a relaunch loads nothing and writes nothing
    assert r["again"].count("finished before") == 2 and r["again_unchanged"]
    assert "resumed from" not in r["again"] and "examples" not in r["again"]
    # the last step is checkpointed before the export: a crash after it redoes no step, the
    # relaunch only exports (the same weights) and marks the stage done
    assert "[sft] resumed from" in r["crashed"] and "(step 2)" in r["crashed"]
    assert [x["step"] for x in rows(out / "stage-sft" / "metrics.jsonl")] == [1, 2]
    assert equal(weights(out / "stage-sft"), r["sft_export"])
    assert (out / "stage-sft" / "DONE.json").exists() and "[1] finished before" in r["crashed"]


@pytest.mark.slow
def test_a_finished_stage_removes_its_checkpoints_unless_kept(sequence, full):
    out, _ = sequence
    full, _ = full
    # Stage I (the default): the checkpoint of the stop went once the export was written
    done = json.loads((out / "stage-1" / "DONE.json").read_text())
    assert done["steps"] == 3 and done["checkpoint"] is None
    assert done["export"] == str(out / "stage-1" / "export")
    assert not (out / "stage-1" / "checkpoints").exists()
    # keep_finished_checkpoints (the cold start's preset, and the flag on the two agents' run):
    # kept, the last step's marked final
    sft = json.loads((out / "stage-sft" / "DONE.json").read_text())
    assert sft["checkpoint"] == str(out / "stage-sft" / "checkpoints" / "step_000002")
    assert fsdp.checkpoint_info(sft["checkpoint"])["final"] is True
    assert sorted(os.listdir(full / "checkpoints")) == ["step_000002", "step_000003"]


@pytest.mark.slow
def test_two_agents_train_save_and_resume(sequence, full):
    """Two torchrun agents sharing one out_dir: a run of its own (every step, a checkpoint
    each) and the relaunch of the stopped sequence (resumed from its checkpoint)."""
    out, r = sequence
    full, log = full
    assert [x["step"] for x in rows(full / "metrics.jsonl")] == [1, 2, 3]
    # a single preset's last line names its own metrics file
    assert f"[done] metrics in {full}/metrics.jsonl" in log
    assert f"[done] metrics in {out}/stage-*/metrics.jsonl" in r["resumed"]
    assert all(x["grad_norm"] > 1e-3 for x in rows(full / "metrics.jsonl"))
    assert "2 ranks" in r["resumed"] and "resumed from" in r["resumed"]
    assert equal(weights(out / "stage-1"), weights(full))


# --------------------------------------------------------------------------- in process


def test_a_stop_signal_is_recorded_and_agreed_on(monkeypatch):
    monkeypatch.setattr(fsdp.dist, "all_reduce", lambda tensor, *a, **k: None)  # a world of one
    monkeypatch.setitem(fsdp._caught, "signal", 0)
    old = {s: signal.getsignal(s) for s in fsdp.STOP_SIGNALS}
    try:
        fsdp.catch_stop_signals()
        assert fsdp.stop_requested() == 0
        os.kill(os.getpid(), signal.SIGUSR1)  # the default action would end this process
        assert fsdp.stop_requested() == signal.SIGUSR1
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


WORKER = """
import os, signal, sys, time
signal.signal(signal.SIGUSR1, lambda *a: print("worker caught SIGUSR1", flush=True))
os.kill(os.getppid(), signal.SIGUSR1)  # the agent, as `--signal=USR1@...` without B: reaches it
os.kill(os.getpid(), signal.SIGUSR1)
time.sleep(2)
"""


@pytest.mark.slow
@pytest.mark.parametrize("ignored", [False, True])
def test_sigusr1_ends_the_torchrun_agent_unless_it_is_ignored_there(tmp_path, ignored):
    """The README's recipe: `trap '' USR1` before `exec torchrun` keeps the agent alive (an
    ignored signal stays ignored across exec), while train.py's own handler still catches it."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    run = f"exec {sys.executable} -m torch.distributed.run --standalone --nproc_per_node=1 {script}"
    cmd = ["bash", "-c", ("trap '' USR1; " if ignored else "") + run]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=120)
    if ignored:
        assert proc.returncode == 0 and "worker caught SIGUSR1" in proc.stdout, proc.stderr
    else:  # the default action: the agent dies of it (and its worker is left behind)
        assert proc.returncode == -signal.SIGUSR1, (proc.returncode, proc.stderr[-2000:])


def test_a_rank_short_of_micro_batches_runs_a_two_token_dummy(tiny_path, processor, monkeypatch):
    from train_items import fixed_groups
    from transformers import Qwen3VLForConditionalGeneration

    from packing import use_packed_attention

    model = Qwen3VLForConditionalGeneration.from_pretrained(tiny_path)
    use_packed_attention(model)
    cfg = preset("demo-1")
    trainer = train.Trainer(cfg, model, None, None, None, None, processor, torch.device("cpu"),
                            [], [])  # fmt: skip
    groups = fixed_groups(processor, n_groups=3)
    sequences = [(g.prompt, [s.ids for s in g.samples]) for g in groups]
    budget = 10**6  # every group fits one micro-batch; another rank has 3
    monkeypatch.setattr(fsdp, "all_reduce", lambda values, op=None: [3.0])
    packed, pack = [], train.pack

    def recording(rows, rope_index, packing):
        packed.append(pack(rows, rope_index, packing))
        return packed[-1]

    monkeypatch.setattr(train, "pack", recording)
    passes = list(train.forward_micro_batches(trainer, model, sequences, budget))
    assert [real for _, _, real in passes] == [True, False, False]
    lengths = [p.inputs["input_ids"].shape[1] for p in packed]
    real_tokens = sum(g.prompt["input_ids"].shape[1] + sum(len(s.ids) for s in g.samples)
                      for g in groups)  # fmt: skip
    assert lengths == [real_tokens, 2, 2]  # a dummy: one prompt token and one response token
    assert [len(logps) for _, logps, real in passes if not real] == [1, 1]
    assert [segments for segments, _, real in passes if not real] == [[], []]
