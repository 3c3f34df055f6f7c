"""Shared fixtures: the tiny Qwen3-VL checkpoint is built once per test run."""

import os
import sys

# One thread per process on this 2-core machine; vLLM in process (engine start ~3 s, not ~45 s).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory) -> str:
    """The tiny random Qwen3-VL checkpoint, built once per test run."""
    from tiny import build_tiny

    return build_tiny(str(tmp_path_factory.mktemp("tiny") / "ckpt"))


@pytest.fixture(scope="session")
def processor(tiny_path):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_path)


@pytest.fixture(scope="session")
def tokenizer(processor):
    return processor.tokenizer


@pytest.fixture(scope="session")
def engine(tiny_path):
    """One in-process vLLM engine on the tiny model for the whole run (start ~5 s)."""
    from rollout import VLLMEngine

    # on a GPU: a fifth of the card (the default half would leave too little for the engines
    # that tests started later in the same run still need: vLLM checks free memory at start)
    eng = VLLMEngine(tiny_path, max_model_len=1024, kv_cache_gb=0.25, seed=0,
                     gpu_memory_utilization=0.2)  # fmt: skip
    yield eng
    eng.close()
