"""The GPU path's memory choreography, checked on CPU with recording stand-ins where vLLM's CPU
backend cannot show it: the order of frees, wakes and the sync; the sleep level; the dtype the
weights are gathered in; the engines of coldstart.py; expandable segments under either name of
torch's allocator variable; the dtype rule of the export."""

import json
import os

import pytest
import torch

import coldstart
import fsdp
import rollout
import train
from rollout import Rollout, VLLMEngine, memory_kwargs


class Recorder:
    """Records every call made on it (and on its attributes) as `(name, args, kwargs)`."""

    def __init__(self, log: list, prefix: str = "") -> None:
        self._log, self._prefix = log, prefix

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        return Recorder(self._log, f"{self._prefix}{name}.")

    def __call__(self, *args, **kwargs):
        self._log.append((self._prefix.rstrip("."), args, kwargs))
        return []


def gpu_engine(log: list, *, sleep_mode: bool = True) -> VLLMEngine:
    """A VLLMEngine as it is on a GPU, around a recording `llm` (nothing is started)."""
    engine = VLLMEngine.__new__(VLLMEngine)
    engine.llm, engine.on_gpu, engine.sleep_mode = Recorder(log), True, sleep_mode
    engine.dtype, engine.forbidden = torch.bfloat16, []
    engine.sleeping, engine.weights_discarded = set(), False
    return engine


def test_sync_frees_the_cache_before_each_wake_and_gathers_in_the_engine_dtype(monkeypatch):
    """free, wake the weights, sync, free again (the gathered weights' blocks), wake the KV
    cache: on today's main the second free was missing and the gather was float32."""
    calls = []

    class Engine:
        dtype = torch.bfloat16

        def wake(self, tags=None):
            calls.append(("wake", tuple(tags)))

        def sync_weights(self, named):
            calls.append(("sync", [(k, v.dtype) for k, v in named]))

    def full_weights(model, dtype=None):
        calls.append(("gather", dtype))
        yield "w", torch.ones(2, dtype=dtype)

    monkeypatch.setattr(train, "free_cache", lambda: calls.append(("free",)))
    monkeypatch.setattr(train, "full_weights", full_weights)
    t = train.Trainer(None, None, None, None, None, Engine(), None, None, [], [])
    train.sync_engine(t)
    assert calls == [
        ("free",),
        ("wake", ("weights",)),
        ("gather", torch.bfloat16),
        ("sync", [("w", torch.bfloat16)]),
        ("free",),
        ("wake", ("kv_cache",)),
    ]


def test_sleep_discards_the_weights_at_level_2_and_sampling_waits_for_a_sync():
    log = []
    engine = gpu_engine(log)
    engine.sleep()
    assert [c for c in log if c[0] == "sleep"] == [("sleep", (), {"level": 2})]
    assert rollout.SLEEP_LEVEL == 2
    engine.wake(["weights"])
    engine.wake(["kv_cache"])
    assert [c for c in log if c[0] == "wake_up"] == [
        ("wake_up", (), {"tags": ["weights"]}),
        ("wake_up", (), {"tags": ["kv_cache"]}),
    ]
    with pytest.raises(RuntimeError, match="sync_weights"):  # woken, but the weights are gone
        engine.generate([{"prompt": "x"}], 1, rollout.Sampling())
    engine.sync_weights([("lm_head.weight", torch.zeros(1))])
    assert not engine.weights_discarded
    engine.generate([{"prompt": "x"}], 1, rollout.Sampling())  # allowed again
    assert log[-1][0] == "generate"


def test_an_engine_without_sleep_mode_refuses_to_sleep_and_asks_vllm_for_no_pool():
    with pytest.raises(RuntimeError, match="sleep_mode=False"):
        gpu_engine([], sleep_mode=False).sleep()
    assert memory_kwargs(True, True, 0.4, 1.0) == {
        "gpu_memory_utilization": 0.4,
        "enable_sleep_mode": True,
    }
    assert memory_kwargs(True, False, 0.4, 1.0) == {"gpu_memory_utilization": 0.4}
    assert memory_kwargs(False, True, 0.4, 0.5) == {"kv_cache_memory_bytes": 512 * 1024**2}


@pytest.mark.parametrize("name", ["PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"])
def test_expandable_segments_are_switched_off_around_vllms_pool_under_either_name(
    name, monkeypatch
):
    """vLLM 0.32's own sleep-mode pool code, run on CPU: torch's newer variable name is read
    like the old one, and only the one flag is flipped, the rest of the setting kept."""
    from vllm.device_allocator import cumem

    for other in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_HIP_ALLOC_CONF"):
        monkeypatch.delenv(other, raising=False)
    monkeypatch.setenv(name, "expandable_segments:True,max_split_size_mb:512")
    written = []
    monkeypatch.setattr(cumem, "set_alloc_conf", written.append)
    monkeypatch.setattr(cumem, "current_alloc_conf", lambda: os.environ[name])

    class Pool:  # stands in for the CUDA pluggable allocator's pool
        def __enter__(self):
            written.append("inside")
            return (object(), object())

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(cumem, "use_memory_pool_with_allocator", lambda *a: Pool())
    monkeypatch.setattr(cumem.CuMemAllocator, "_trim", lambda self, pool: None)
    allocator = cumem.CuMemAllocator()
    with allocator.use_memory_pool(tag="kv_cache"):
        pass
    assert written == [
        "expandable_segments:False,max_split_size_mb:512",
        "inside",
        "expandable_segments:True,max_split_size_mb:512",
    ]


def test_export_dtype_is_the_dtype_the_run_computed_in():
    model = torch.nn.Linear(2, 2)
    assert fsdp.export_dtype(model) == torch.float32  # no record: the weights' own float32
    model.compute_dtype = torch.bfloat16  # load_model on GPUs
    assert fsdp.export_dtype(model) == torch.bfloat16
    model.compute_dtype = torch.float32  # load_model on CPU
    assert fsdp.export_dtype(model) == torch.float32


def test_coldstart_frees_the_first_engine_before_the_second_and_neither_sleeps(
    tiny_path, tmp_path, monkeypatch
):
    """With a strong model the policy's engine is closed and freed before the strong one
    starts; neither asks vLLM for its process-wide sleep-mode pool."""
    events = []

    class Engine:
        max_model_len = 4096

        def __init__(self, model, **kw):
            events.append(("start", model, kw["sleep_mode"]))
            self.model = model

        def generate(self, prompts, n, sampling, prefixes=None, image_size=None):
            text = "<think>x</think> \\boxed{1}"
            return [[Rollout([1], [-0.1], text, "stop")] * n for _ in prompts]

        def close(self):
            events.append(("close", self.model))

    monkeypatch.setattr(rollout, "VLLMEngine", Engine)
    monkeypatch.setattr(fsdp, "free_cache", lambda: events.append(("free",)))
    out = tmp_path / "cold.jsonl"
    mixed = lambda phase, texts, examples: [k % 2 == 0 for k in range(len(texts))]  # noqa: E731
    counts = coldstart.main(["--policy", tiny_path, "--strong", "strong-model", "--data",
                             "synthetic:2", "--out", str(out), "--samples", "2"], grade=mixed)  # fmt: skip
    assert events == [
        ("start", tiny_path, False),
        ("close", tiny_path),
        ("free",),
        ("start", "strong-model", False),
        ("close", "strong-model"),
        ("free",),
    ]
    assert counts["o1_samples"] == 4
    assert json.loads((tmp_path / "cold.jsonl.summary.json").read_text()) == counts
