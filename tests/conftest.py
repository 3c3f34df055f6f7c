"""Shared fixtures: the tiny Qwen3-VL checkpoint is built once per test run."""

import os
import sys

# One thread per process on this 2-core machine; vLLM in process (engine start ~3 s, not ~45 s).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
