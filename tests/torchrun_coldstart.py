"""coldstart.py under torchrun, run by test_coldstart.py:

    torchrun --nproc_per_node=2 tests/torchrun_coldstart.py TINY STRONG OUT

Each rank samples its share of synthetic:6 with its own engine, then its o2 with the STRONG
one (the policy's closed first); the grades are set by input
(i % 3: all-correct, mixed, all-wrong), since the random tiny model never answers right.
"""

import sys

import coldstart

T, F = True, False


def grade(phase, texts, examples):
    if phase == "o2":
        return [True] * len(texts)
    pattern = {0: [T] * 4, 1: [F, T, T, F], 2: [F] * 4}
    return [pattern[int(e["id"].rsplit("-", 1)[1]) % 3][j % 4] for j, e in enumerate(examples)]


if __name__ == "__main__":
    tiny, strong, out = sys.argv[1:4]
    coldstart.main(["--policy", tiny, "--strong", strong, "--data", "synthetic:6", "--out", f"{out}/cs.jsonl",
                    "--inputs", "4", "--max_tokens", "8", "--o2_max_tokens", "8",
                    "--max_model_len", "512", "--kv_cache_gb", "0.1"], grade=grade)  # fmt: skip
