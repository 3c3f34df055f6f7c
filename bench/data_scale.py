"""What loading the RL data costs per row: peak memory and start-up time, on generated
ViRL-39K-shaped parquet at two sizes, with the extrapolation to ViRL-39K itself.

    .venv/bin/python bench/data_scale.py                       # 300 and 1200 rows
    .venv/bin/python bench/data_scale.py --rows 500 2000 --modes encoded decoded

The parquet has the columns of the ViRL-39K parquet mirror (Kun-Xiang/ViRL39K, dataset card:
`answer`, `category`, `qid`, `images` as a list of HF image structs `{bytes, path}`, `problem`
with an `<image>` tag, `id` int64; 38,870 rows, 2.9 GB): one distinct 640x480 JPEG of ~93 KiB
per row and a `\\boxed{}` answer. Each (size, mode) is measured in a fresh process: the peak
resident memory that loading adds (VmHWM after, reset just before, minus VmRSS before) and the
wall-clock time of `data.load_split` (rows read, images' headers read, prompt lengths counted
with the tiny model's processor), per row. Per-row figures come from the difference between the
two sizes, so fixed costs (imports, the processor) cancel.

Modes: `encoded` is train.py's path (images kept encoded, decoded in the step); `decoded` also
decodes every image at load and keeps it, as data.py did before (the cost this replaced);
`datasets` reads the same file through HF `datasets` (Arrow memory-mapped, `Image(decode=False)`,
headers read for the sizes), when it is importable: the library EasyR1 reads its data with.
Goals (README, Benchmarks): peak memory per row at most 2x the compressed bytes per row,
start-up at most 5 ms per row.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VIRL_ROWS = 38_870  # ViRL-39K (TIGER-Lab/ViRL39K dataset card)


def make_parquet(path: str, rows: int, seed: int = 0) -> float:
    """ViRL-39K-shaped parquet with `rows` rows; returns the mean JPEG bytes per row."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rng = np.random.default_rng(seed)
    gradient = np.linspace(0, 255, 640)[None, :, None] * np.ones((480, 1, 3))
    # noise of sd 16 on a gradient: JPEG quality 85 gives ~93 KiB, ViRL-39K's mean image size
    fields = [rng.normal(0, 16, (480, 640, 3)) for _ in range(8)]
    out, total = [], 0
    for i in range(rows):
        pixels = (gradient + np.roll(fields[i % 8], i, axis=1)).clip(0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=85)
        total += buf.tell()
        out.append({
            "answer": f"\\boxed{{{i % 97}}}",
            "category": "(GradeSchool) Geometric",
            "qid": f"q{i}",
            "images": [{"bytes": buf.getvalue(), "path": f"img_{i}.jpg"}],
            "problem": f"<image>As shown in the figure, find the value of x in case {i}.",
            "id": i,
        })  # fmt: skip
    schema = pa.schema([
        ("answer", pa.string()), ("category", pa.string()), ("qid", pa.string()),
        ("images", pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))),
        ("problem", pa.string()), ("id", pa.int64()),
    ])  # fmt: skip
    pq.write_table(pa.Table.from_pylist(out, schema=schema), path, row_group_size=256)
    return total / rows


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def _reset_peak() -> None:
    """Start the peak (VmHWM) afresh at the current RSS: the imports and the processor peaked
    higher than the load itself may (Linux: /proc/self/clear_refs, "5")."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def measure(path: str, mode: str, tiny: str) -> dict:
    """In this (fresh) process: the memory and time `mode` takes to load `path`."""
    sys.path.insert(0, ROOT)
    from transformers import AutoProcessor

    import data
    from config import preset

    processor = AutoProcessor.from_pretrained(tiny)
    cfg = preset("octopus-8b-stage1", max_prompt_len=100_000)
    _reset_peak()
    before = _status("VmRSS")
    start = time.perf_counter()
    if mode == "datasets":
        examples = _via_datasets(path, processor, cfg)
    else:
        examples, _ = data.load_split(path, cfg, processor, seed=0)
        if mode == "decoded":
            examples, _ = data.decode_examples(examples)
    seconds = time.perf_counter() - start
    peak = _status("VmHWM")
    return {"rows": len(examples), "added_peak": peak - before, "seconds": seconds}


def _via_datasets(path: str, processor, cfg) -> list:
    """The same rows through HF datasets: Arrow cache memory-mapped, images not decoded; the
    prompt-length filter still needs every image's size, read from its header."""
    import datasets

    import data

    cache = tempfile.mkdtemp(prefix="ds-cache-")
    ds = datasets.load_dataset("parquet", data_files=path, split="train", cache_dir=cache)
    ds = ds.cast_column("images", datasets.Sequence(datasets.Image(decode=False)))
    kept = []
    for i, row in enumerate(ds):
        example = data.row_to_example(row, where=f"{path}:row {i + 1}", base_dir=".")
        if data.prompt_length(processor, example) <= cfg.max_prompt_len:
            kept.append(i)  # the example itself stays in the memory-mapped table
    return kept


def run_child(path: str, mode: str, tiny: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [ROOT, *filter(None, [os.environ.get("PYTHONPATH")])]))  # fmt: skip
    cmd = [sys.executable, os.path.abspath(__file__), "--child", path, mode, tiny]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{mode} on {path} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, nargs=2, default=[300, 1200], help="the two sizes")
    ap.add_argument("--modes", nargs="+", default=["encoded", "decoded", "datasets"],
                    choices=["encoded", "decoded", "datasets"])  # fmt: skip
    ap.add_argument(
        "--workdir", default="", help="where the parquet files go (default: a temp dir)"
    )
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(measure(*args.child)))
        return
    sys.path.insert(0, ROOT)
    from tiny import build_tiny

    tiny = build_tiny()
    modes = list(args.modes)
    if "datasets" in modes:
        try:
            import datasets  # noqa: F401
        except ImportError:
            print("[data_scale] HF datasets not importable: the datasets column is left out")
            modes.remove("datasets")
    work = args.workdir or tempfile.mkdtemp(prefix="data-scale-")
    os.makedirs(work, exist_ok=True)
    small, big = sorted(args.rows)
    files, jpeg = {}, {}
    for n in (small, big):
        files[n] = os.path.join(work, f"virl-shaped-{n}.parquet")
        jpeg[n] = make_parquet(files[n], n)
    per_row_bytes = (jpeg[small] * small + jpeg[big] * big) / (small + big)
    print(f"ViRL-39K-shaped parquet: {small} and {big} rows, 640x480 JPEG of "
          f"{per_row_bytes / 1024:.1f} KiB per row (compressed)\n")  # fmt: skip
    print("| mode | rows | added peak RSS MiB | load s | per row: peak KiB | x compressed | "
          "ms | ViRL-39K (38,870 rows): peak GiB per rank | start-up s |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for mode in modes:
        got = {n: run_child(files[n], mode, tiny) for n in (small, big)}
        for n in (small, big):
            assert got[n]["rows"] == n, (mode, n, got[n])
        d_mem = (got[big]["added_peak"] - got[small]["added_peak"]) / (big - small)
        d_sec = (got[big]["seconds"] - got[small]["seconds"]) / (big - small)
        for n in (small, big):
            g = got[n]
            print(
                f"| {mode} | {n} | {g['added_peak'] / 2**20:.1f} | {g['seconds']:.2f} | | | | | |"
            )
        print(f"| {mode} | per row | | | {d_mem / 1024:.1f} | {d_mem / per_row_bytes:.2f} | "
              f"{1000 * d_sec:.2f} | {d_mem * VIRL_ROWS / 2**30:.1f} | "
              f"{d_sec * VIRL_ROWS:.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
