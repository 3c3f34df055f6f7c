"""Evaluate self-correction (PAPER.md §1, §7; Table 1, Fig. 7): acc@1 (o1), acc@2 (final
answer), c->w / w->c rates, how often the model corrects itself, sequential test-time scaling
(force K extra rounds by appending SC) and pass@k.

    python eval.py --model runs/demo/stage-2/export --data synthetic:256 --out runs/eval
    python eval.py --model runs/octopus-stage2/export --data MathVista_MINI.tsv --n 8
    torchrun --nproc_per_node=8 eval.py --model ... --data ... --sc-rounds 3   # data-parallel

Modes: default (the model decides whether to correct itself), `--direct` (stop at
`<self-correction>`: direct reasoning only), `--sc-rounds K` (after the model's answer, append
SC and continue, K times). Sampling defaults are the paper's: temperature 0.6, top-p 0.95,
no top-k, up to 16384 new tokens. Inputs: JSONL / parquet / HF folders (data.py) and
VLMEvalKit TSV files (index, base64 image, question, answer, options A, B, ...).
"""

from __future__ import annotations

import argparse
import base64
import csv
import io
import json
import math
import os
import sys
from collections import defaultdict

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

from data import load_examples, resize_image, synthetic_task  # noqa: E402
from octopus import OCTOPUS_SUFFIX, SC, SC_OPEN, split_rounds  # noqa: E402
from reward import answer_of, is_equivalent  # noqa: E402

# =============================================================================================
# Metrics: pure functions over graded records
# =============================================================================================


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n - c, k) / C(n, k)."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def grade_rounds(text: str, truth: str) -> list[dict]:
    """Each answer of a response (o1, o2, o3 ... split at SC) with its correctness."""
    out = []
    for part in split_rounds(text):
        answer = answer_of(part)
        out.append({"answer": answer, "correct": bool(answer) and is_equivalent(answer, truth)})
    return out


def summarize(records: list[dict], ks: list[int] | None = None) -> dict:
    """Aggregate graded records (one per sample: `id`, `rounds` from `grade_rounds`, `tokens`,
    optional `category`, optional `round_tokens`) into the paper's measures.

    acc@1: o1 correct. acc@2: the final answer correct. c->w / w->c: over samples that
    corrected themselves, the share that went right->wrong / wrong->right, and their shares of
    all samples. pass@k: unbiased, over the samples of each prompt id (k = 1, 2, 4 ... n).
    """
    n = len(records)
    if n == 0:
        return {"samples": 0}
    first = [r["rounds"][0]["correct"] for r in records]
    final = [r["rounds"][-1]["correct"] for r in records]
    corrected = [r for r in records if len(r["rounds"]) > 1]
    cw = sum(r["rounds"][0]["correct"] and not r["rounds"][-1]["correct"] for r in corrected)
    wc = sum(not r["rounds"][0]["correct"] and r["rounds"][-1]["correct"] for r in corrected)
    out: dict = {
        "samples": n,
        "acc@1": sum(first) / n,
        "acc@2": sum(final) / n,
        "corrects_itself": len(corrected) / n,
        "c->w": cw / n,
        "w->c": wc / n,
        "c->w_of_corrections": cw / len(corrected) if corrected else 0.0,
        "w->c_of_corrections": wc / len(corrected) if corrected else 0.0,
        "mean_tokens": sum(r["tokens"] for r in records) / n,
    }
    # forced rounds (Fig. 7a): accuracy after each round and the tokens spent up to it
    depth = max(len(r["rounds"]) for r in records)
    if any("round_tokens" in r for r in records):
        out["rounds"] = [
            {
                "round": i,
                "acc": sum(r["rounds"][min(i, len(r["rounds"]) - 1)]["correct"] for r in records)
                / n,
                "cumulative_tokens": sum(sum(r["round_tokens"][: i + 1]) for r in records) / n,
            }
            for i in range(depth)
        ]
    # pass@k (Fig. 7b) over the final answers of each prompt's samples
    by_id: dict[str, list[bool]] = defaultdict(list)
    for r, ok in zip(records, final, strict=True):
        by_id[r["id"]].append(ok)
    n_per = min(len(v) for v in by_id.values())
    ks = ks or [2**i for i in range(int(math.log2(n_per)) + 1)]
    out["pass@k"] = {
        str(k): sum(pass_at_k(len(v), sum(v), k) for v in by_id.values()) / len(by_id)
        for k in ks
        if k <= n_per
    }
    cats: dict[str, list[bool]] = defaultdict(list)
    for r, ok in zip(records, final, strict=True):
        if r.get("category") is not None:
            cats[r["category"]].append(ok)
    if cats:
        out["per_category"] = {c: sum(v) / len(v) for c, v in sorted(cats.items())}
    return out


# =============================================================================================
# Inputs: VLMEvalKit TSV files
# =============================================================================================


def load_vlmevalkit_tsv(
    path: str, *, suffix: str = OCTOPUS_SUFFIX, max_pixels: int = 1280 * 28 * 28
) -> list[dict]:
    """A VLMEvalKit benchmark TSV -> examples. Multiple choice is built as VLMEvalKit does:
    the hint, the question, "Options:" with one "A. ..." line per option, then the instruction
    to select an answer; the ground truth is the option letter."""
    from PIL import Image

    csv.field_size_limit(sys.maxsize)
    examples = []
    with open(path, newline="", encoding="utf-8") as f:
        for row_no, row in enumerate(csv.DictReader(f, delimiter="\t"), start=2):
            options = {L: row[L] for L in "ABCDEFGHIJ" if row.get(L) not in (None, "", "nan")}
            question = row["question"]
            if row.get("hint") not in (None, "", "nan"):
                question = f"Hint: {row['hint']}\n{question}"
            if options:
                question += "\nOptions:\n" + "".join(f"{k}. {v}\n" for k, v in options.items())
                question += "Please select the correct answer from the options above."
            try:
                image = Image.open(io.BytesIO(base64.b64decode(row["image"])))
                image.load()
            except Exception as e:
                raise ValueError(f"{path}:row {row_no}: field image: unreadable ({e})") from None
            image = resize_image(image, 4 * 32 * 32, max_pixels)
            content = [
                {"type": "image", "image": image},
                {"type": "text", "text": question + suffix},
            ]
            example = {"id": str(row.get("index", row_no)), "messages": [{"role": "user", "content": content}],
                       "answer": str(row["answer"]).strip()}  # fmt: skip
            if row.get("category"):
                example["category"] = row["category"]
            examples.append(example)
    return examples


def load_eval_data(spec: str, *, max_pixels: int = 1280 * 28 * 28) -> list[dict]:
    if spec.startswith("synthetic:"):
        return synthetic_task(int(spec.split(":")[1]), seed=12345)
    if spec.endswith(".tsv"):
        return load_vlmevalkit_tsv(spec, max_pixels=max_pixels)
    examples, report = load_examples(spec, max_pixels=max_pixels)
    if report.skipped:
        print(f"[eval] {spec}: {report.summary()}", file=sys.stderr)
    return examples


# =============================================================================================
# Running the model
# =============================================================================================


def run(
    engine, processor, examples: list[dict], *, n: int, sampling, direct: bool, sc_rounds: int
) -> list[dict]:
    """Sample, force extra rounds if asked, and grade. One record per sample."""
    from dataclasses import replace

    from rollout import render_prompt

    prompts = [render_prompt(processor, e["messages"]) for e in examples]
    if direct:
        sampling = replace(sampling, stop=(*sampling.stop, SC_OPEN))
    groups = engine.generate(prompts, n, sampling)
    records = []
    for e, p, group in zip(examples, prompts, groups, strict=True):
        for g in group:
            text, round_tokens = g.text, [len(g.ids)]
            if direct:
                text = text.split(SC_OPEN)[0].rstrip("<").rstrip()
            for _ in range(sc_rounds):  # Fig. 7a: append exactly SC after the last answer
                prefix = text.rstrip() + SC
                more = engine.generate([p], 1, sampling, prefixes=[prefix])[0][0]
                text = prefix + more.text
                round_tokens.append(len(more.ids))
            rec = {"id": e["id"], "response": text, "truth": e["answer"], "tokens": sum(round_tokens),
                   "rounds": grade_rounds(text, e["answer"])}  # fmt: skip
            if sc_rounds:
                rec["round_tokens"] = round_tokens
            if e.get("category") is not None:
                rec["category"] = e["category"]
            records.append(rec)
    return records


def plot(summary: dict, out_dir: str) -> list[str]:
    """PNG plots (matplotlib, optional extra): accuracy vs cumulative tokens over forced rounds,
    and the pass@k curve."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    if summary.get("rounds"):
        fig, ax = plt.subplots(figsize=(4, 3))
        xs = [r["cumulative_tokens"] for r in summary["rounds"]]
        ax.plot(xs, [r["acc"] for r in summary["rounds"]], marker="o")
        ax.set(xlabel="cumulative tokens", ylabel="accuracy", title="sequential test-time scaling")
        fig.tight_layout()
        fig.savefig(path := os.path.join(out_dir, "rounds.png"))
        written.append(path)
    if summary.get("pass@k"):
        fig, ax = plt.subplots(figsize=(4, 3))
        ks = sorted(summary["pass@k"], key=int)
        ax.plot([int(k) for k in ks], [summary["pass@k"][k] for k in ks], marker="o")
        ax.set(xscale="log", xlabel="k", ylabel="pass@k", title="pass@k")
        fig.tight_layout()
        fig.savefig(path := os.path.join(out_dir, "pass_at_k.png"))
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> dict:
    import torch.distributed as dist
    from transformers import AutoProcessor

    from rollout import Sampling, VLLMEngine

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument(
        "--data", required=True, help="JSONL / parquet / HF folder / VLMEvalKit .tsv / synthetic:N"
    )
    ap.add_argument("--out", default="runs/eval")
    ap.add_argument("--n", type=int, default=1, help="samples per prompt (pass@k up to n)")
    ap.add_argument("--direct", action="store_true", help="stop at <self-correction>")
    ap.add_argument("--sc-rounds", type=int, default=0, help="force K extra correction rounds")
    ap.add_argument("--temperature", type=float, default=0.6)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--max-tokens", type=int, default=16384)
    ap.add_argument("--max-model-len", type=int, default=32768)
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--kv-cache-gb", type=float, default=1.0)
    args = ap.parse_args(argv)

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")  # only to gather results; each rank has its own engine
    rank = dist.get_rank() if dist.is_initialized() else 0
    examples = load_eval_data(args.data)
    if args.limit:
        examples = examples[: args.limit]
    processor = AutoProcessor.from_pretrained(args.model)
    engine = VLLMEngine(
        args.model, max_model_len=args.max_model_len, seed=rank, kv_cache_gb=args.kv_cache_gb
    )
    sampling = Sampling(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens)
    records = run(engine, processor, examples[rank::world], n=args.n, sampling=sampling, direct=args.direct,
                  sc_rounds=args.sc_rounds)  # fmt: skip
    if dist.is_initialized():
        gathered: list = [None] * world
        dist.all_gather_object(gathered, records)
        records = [r for part in gathered for r in part]
    summary = summarize(records)
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "samples.jsonl"), "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
        with open(os.path.join(args.out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        plot(summary, args.out)
        print(json.dumps(summary, indent=1))
    engine.close()
    if dist.is_initialized():
        dist.destroy_process_group()
    return summary


if __name__ == "__main__":
    main()
