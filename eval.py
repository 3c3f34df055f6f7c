"""Evaluate self-correction (arXiv 2602.08503, Tables 2-3 and Fig. 7): acc@1 (o1), acc@2 (the
final answer), c->w / w->c rates, how often the model corrects itself, sequential test-time
scaling (force K extra rounds by appending SC, Fig. 7a) and pass@k (Fig. 7b).

    python eval.py --model runs/demo/stage-2/export --data synthetic:256 --out runs/eval
    python eval.py --model runs/octopus-stage2/export --data MathVista_MINI.tsv --n 8
    torchrun --nproc_per_node=8 eval.py --model ... --data ... --sc_rounds 3   # data-parallel
    # Table 2: acc@1 / acc@2 on the seven benchmarks (VLMEvalKit TSVs in --bench_dir) and the mean
    torchrun --nproc_per_node=8 eval.py --table2 --model runs/octopus-8b/stage-2/export \
        --bench_dir data/benchmarks

Modes: default (the model decides whether to correct itself), `--direct` (stop at
`<self-correction>`: direct reasoning only), `--sc_rounds K` (after the model's answer, append
SC and continue, K times). Sampling defaults are the paper's: temperature 0.6, top-p 0.95,
no top-k, up to 16384 new tokens in a 32768-token context; both lengths are clamped to what the
model allows, with one line saying so. Images are resized into [256*28*28, 1280*28*28] pixels
(`--min_pixels`, `--max_pixels`; the released inference setting) for every file format; the
images of `synthetic:N` are used as drawn. Inputs: JSONL / parquet / HF folders (data.py) and
VLMEvalKit TSV files (index, base64 image, question, answer, options A, B, ...). Images stay
encoded until the prompts are rendered; a row whose image does not decode is skipped, counted
(`skipped_images` in the summary) and named on stderr.
"""

from __future__ import annotations

import argparse
import ast
import csv
import json
import math
import os
import sys
from collections import defaultdict

from config import MAX_PIXELS, MIN_PIXELS
from data import (
    DataError,
    LoadReport,
    decode_examples,
    encode_image,
    load_examples,
    max_images_of,
    prompt_length,
    synthetic_size,
    synthetic_task,
)
from octopus import OCTOPUS_SUFFIX, SC, SC_OPEN, split_rounds
from reward import answer_of, is_equivalent

# Tokens kept free when deciding whether a forced round still fits the context: the continued
# prompt is re-tokenized from text, which can differ from the sampled ids by a few tokens.
CONTEXT_MARGIN = 16

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
    path: str,
    *,
    suffix: str = OCTOPUS_SUFFIX,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
    split: str | None = None,
    report: LoadReport | None = None,
) -> list[dict]:
    """A VLMEvalKit benchmark TSV -> examples (images encoded, resized into `[min_pixels,
    max_pixels]` when decoded). Columns as VLMEvalKit's TSVs have them (vlmeval/dataset/
    image_base.py, image_mcq.py): `index`, `image` (base64; a short cell names the `index` of
    the row holding the same image; a list literal `['b64', ...]` holds several images),
    `question`, `answer`, optional `hint`, options `A`, `B`, ..., `category`, `split`. With
    options the prompt is VLMEvalKit's multiple-choice prompt ("Hint:", "Question:", "Options:"
    with one "A. ..." line each, then the instruction to select) and the truth is the letter;
    without, the question alone. `split` keeps only rows of that split (MMMU_DEV_VAL holds
    "dev" and "validation"). A bad row is skipped and named in `report` (when given)."""
    csv.field_size_limit(sys.maxsize)
    report = report if report is not None else LoadReport()
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    # VLMEvalKit stores a repeated image once; other rows name that row's index (<= 64 chars)
    by_index = {str(r.get("index")): r.get("image") or "" for r in rows}
    examples = []
    for row_no, row in enumerate(rows, start=2):
        if split is not None and row.get("split") not in (None, split):
            continue
        report.rows += 1
        try:
            examples.append(_tsv_example(row, f"{path}:row {row_no}", by_index, suffix,
                                         min_pixels, max_pixels))  # fmt: skip
            report.kept += 1
        except DataError as e:
            report.skipped.append(str(e))
    return examples


def _given(value) -> bool:
    return value not in (None, "", "nan", "NaN")


def _tsv_images(cell: str, by_index: dict[str, str]) -> list[str]:
    """The base64 images of one `image` cell (see `load_vlmevalkit_tsv`)."""
    if 0 < len(cell) <= 64 and by_index.get(cell, "") and len(by_index[cell]) > 64:
        cell = by_index[cell]
    if cell.startswith("[") and cell.endswith("]"):
        try:  # a Python list literal of strings (VLMEvalKit's toliststr); never evaluated as code
            images = ast.literal_eval(cell)
        except (ValueError, SyntaxError):
            raise ValueError("an image list that does not parse") from None
        if not isinstance(images, list) or not all(isinstance(x, str) for x in images):
            raise ValueError("an image list that is not a list of strings")
        return images
    return [cell] if cell else []


def _tsv_example(row: dict, where: str, by_index: dict, suffix: str, min_pixels: int,
                 max_pixels: int) -> dict:  # fmt: skip
    if not _given(row.get("question")) or not _given(row.get("answer")):
        raise DataError(
            f"{where}: no {'question' if not _given(row.get('question')) else 'answer'}"
        )
    options = {L: row[L] for L in "ABCDEFGHIJ" if _given(row.get(L))}
    question = row["question"]
    if options:
        hint = f"Hint: {row['hint']}\n" if _given(row.get("hint")) else ""
        question = f"{hint}Question: {question}\nOptions:\n"
        question += "".join(f"{k}. {v}\n" for k, v in options.items())
        question += "Please select the correct answer from the options above."
    try:
        cells = _tsv_images(row.get("image") or "", by_index)
    except ValueError as e:
        raise DataError(f"{where}: field image: {e}") from None
    images = []
    for k, cell in enumerate(cells):
        try:
            images.append(
                encode_image(cell, "", min_pixels, max_pixels, f"{where}: field image[{k}]")
            )
        except ValueError as e:
            raise DataError(f"{where}: field image[{k}]: {e}") from None
    content = [{"type": "image", "image": im} for im in images]
    content.append({"type": "text", "text": question + suffix})
    example = {"id": str(row.get("index") or where), "messages": [{"role": "user", "content": content}],
               "answer": str(row["answer"]).strip()}  # fmt: skip
    if _given(row.get("category")):
        example["category"] = row["category"]
    return example


def load_eval_data(
    spec: str,
    *,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
    split: str | None = None,
) -> list[dict]:
    """`synthetic:N`, a VLMEvalKit `.tsv` (rows of `split` only, when given), or anything data.py
    loads; bad rows are reported on stderr."""
    if (n := synthetic_size(spec)) is not None:
        return synthetic_task(n, seed=12345)
    if spec.endswith(".tsv"):
        report = LoadReport()
        examples = load_vlmevalkit_tsv(spec, min_pixels=min_pixels, max_pixels=max_pixels,
                                       split=split, report=report)  # fmt: skip
    else:
        examples, report = load_examples(spec, min_pixels=min_pixels, max_pixels=max_pixels)
    if report.skipped:
        print(f"[eval] {spec}: {report.summary()}", file=sys.stderr)
    return examples


# =============================================================================================
# Running the model
# =============================================================================================


def fit_max_tokens(max_tokens: int, max_model_len: int, longest_prompt: int) -> int:
    """The response budget that lets the longest prompt and its response fit the context."""
    return max(0, min(max_tokens, max_model_len - longest_prompt))


def run(
    engine,
    processor,
    examples: list[dict],
    *,
    n: int,
    sampling,
    direct: bool,
    sc_rounds: int,
    skipped: list[str] | None = None,
) -> list[dict]:
    """Sample, force extra rounds if asked, and grade. One record per sample.

    Images are decoded here; an example whose image does not decode has no record, and its line
    goes to `skipped` (and stderr). A forced round (Fig. 7a) appends exactly SC after the
    previous answer and continues. Once a sample's context is full (prompt, answers and SC
    reach `engine.max_model_len`) it is not continued: its remaining rounds spend 0 tokens and
    keep its last answer.
    """
    from dataclasses import replace

    from rollout import render_prompt

    examples, bad = decode_examples(examples)
    for line in bad:
        print(f"[eval] skipped, an image does not decode: {line}", file=sys.stderr)
    if skipped is not None:
        skipped += bad
    prompts = [render_prompt(processor, e["messages"]) for e in examples]
    if direct:
        sampling = replace(sampling, stop=(*sampling.stop, SC_OPEN))
    groups = engine.generate(prompts, n, sampling)
    if sc_rounds:
        prompt_lens = [prompt_length(processor, e) for e in examples]
        sc_len = len(processor.tokenizer(SC, add_special_tokens=False)["input_ids"])
    records = []
    for k, (e, p, group) in enumerate(zip(examples, prompts, groups, strict=True)):
        for g in group:
            text, round_tokens = g.text, [len(g.ids)]
            if direct:
                text = text.split(SC_OPEN)[0].rstrip("<").rstrip()
            used = prompt_lens[k] + len(g.ids) if sc_rounds else 0
            for _ in range(sc_rounds):  # Fig. 7a: append exactly SC after the last answer
                if used + sc_len + CONTEXT_MARGIN >= engine.max_model_len:
                    round_tokens.append(0)  # the context is full: nothing more to force
                    continue
                prefix = text.rstrip() + SC
                more = engine.generate([p], 1, sampling, prefixes=[prefix])[0][0]
                text = prefix + more.text
                round_tokens.append(len(more.ids))
                used += sc_len + len(more.ids)
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


# Table 2's seven benchmarks (arXiv 2602.08503, Table 2; the average is the paper's headline):
# (column, the TSV's name in --bench_dir, the rows kept). The names are VLMEvalKit's dataset
# names (vlmeval/dataset: image_vqa.py MathVista / MathVerse, image_mcq.py WeMath / MMStar /
# MMMUDataset, image_yorn.py HallusionBench, charxiv.py), files as its DATASET_URL serves them
# (README "Getting the data"). MathVerse: testmini, vision-only (the paper does not say which
# version; this is the one that needs the image); MMMU: the validation rows of MMMU_DEV_VAL.
TABLE2 = (
    ("MathVista", "MathVista_MINI.tsv", None),
    ("MathVerse", "MathVerse_MINI_Vision_Only.tsv", None),
    ("WeMath", "WeMath.tsv", None),
    ("HallusionBench", "HallusionBench.tsv", None),
    ("MMStar", "MMStar.tsv", None),
    ("MMMU-val", "MMMU_DEV_VAL.tsv", "validation"),
    ("CharXiv-RQ", "CharXiv_reasoning_val.tsv", None),
)


def table2_rows(summaries: dict[str, dict]) -> str:
    """Table 2's layout: one column per benchmark and the average, rows acc@1 and acc@2 (%)."""
    names = [name for name, _, _ in TABLE2 if name in summaries]
    lines = ["| | " + " | ".join(names) + " | Avg |", "|---" * (len(names) + 2) + "|"]
    for key in ("acc@1", "acc@2"):
        values = [100 * summaries[name][key] for name in names]
        cells = [f"{v:.1f}" for v in values] + [f"{sum(values) / len(values):.1f}"]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="HF checkpoint folder (or hub id)")
    ap.add_argument(
        "--data", default="", help="JSONL / parquet / HF folder / VLMEvalKit .tsv / synthetic:N"
    )
    ap.add_argument("--table2", action="store_true",
                    help="evaluate the seven benchmarks of Table 2 (TSVs in --bench_dir) and print "
                    "acc@1, acc@2 and their average per benchmark")  # fmt: skip
    ap.add_argument("--bench_dir", default="data/benchmarks",
                    help="--table2: the folder of VLMEvalKit TSVs (README \"Getting the data\")")  # fmt: skip
    ap.add_argument("--out", default="runs/eval", help="samples.jsonl, summary.json, plots")
    ap.add_argument("--n", type=int, default=1, help="samples per prompt (pass@k up to n)")
    ap.add_argument("--direct", action="store_true", help="stop at <self-correction>")
    ap.add_argument("--sc_rounds", type=int, default=0, help="force K extra correction rounds")
    ap.add_argument("--temperature", type=float, default=0.6)
    ap.add_argument("--top_p", type=float, default=0.95)
    ap.add_argument("--max_tokens", type=int, default=16384, help="new tokens per round")
    ap.add_argument("--max_model_len", type=int, default=32768, help="the engine's context")
    ap.add_argument("--min_pixels", type=int, default=MIN_PIXELS, help="smallest image area")
    ap.add_argument("--max_pixels", type=int, default=MAX_PIXELS, help="largest image area")
    ap.add_argument("--limit", type=int, default=0,
                    help="only the first N examples (0: all); --table2: of each benchmark")  # fmt: skip
    ap.add_argument("--kv_cache_gb", type=float, default=1.0, help="CPU only: KV-cache size")
    args = ap.parse_args(argv)
    if not args.table2 and not args.data:
        ap.error("--data is required (or --table2 with --bench_dir)")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)  # first: `--help` loads nothing
    if args.table2:
        missing = [f for _, f, _ in TABLE2 if not os.path.isfile(os.path.join(args.bench_dir, f))]
        if missing:  # before any model loads
            raise SystemExit(f"[eval] --table2: not in {args.bench_dir}: {', '.join(missing)}. "
                             "The README section \"Getting the data\" has the commands that "
                             "fetch them (VLMEvalKit's TSVs).")  # fmt: skip

    import torch.distributed as dist
    from transformers import AutoProcessor

    from rollout import VLLMEngine

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")  # only to gather results; each rank has its own engine
    rank = dist.get_rank() if dist.is_initialized() else 0
    pixels = dict(min_pixels=args.min_pixels, max_pixels=args.max_pixels)
    if args.table2:  # every benchmark loaded first (images encoded): one engine sized for all
        sets = {name: load_eval_data(os.path.join(args.bench_dir, f), split=split, **pixels)
                for name, f, split in TABLE2}  # fmt: skip
    else:
        sets = {"": load_eval_data(args.data, **pixels)}
    if args.limit:
        sets = {name: examples[: args.limit] for name, examples in sets.items()}
    processor = AutoProcessor.from_pretrained(args.model)
    every = [e for examples in sets.values() for e in examples]
    engine = VLLMEngine(args.model, max_model_len=args.max_model_len, seed=rank,
                        kv_cache_gb=args.kv_cache_gb, max_images=max_images_of(every),
                        **pixels)  # fmt: skip
    summaries = {}
    for name, examples in sets.items():
        out = os.path.join(args.out, name) if name else args.out
        summaries[name] = evaluate(engine, processor, examples, args, out, rank, world)
    if args.table2 and rank == 0:
        table = table2_rows(summaries)
        with open(os.path.join(args.out, "table2.json"), "w") as f:
            json.dump({name: {k: s[k] for k in ("samples", "acc@1", "acc@2", "skipped_images")}
                       for name, s in summaries.items()}, f, indent=1)  # fmt: skip
        with open(os.path.join(args.out, "table2.md"), "w") as f:
            f.write(table + "\n")
        print(table)
    engine.close()
    if dist.is_initialized():
        dist.destroy_process_group()
    return summaries if args.table2 else summaries[""]


def evaluate(engine, processor, examples, args, out: str, rank: int, world: int) -> dict:
    """One data set: the response budget fitted to its longest prompt, this rank's share sampled
    and graded, records gathered, `samples.jsonl` and `summary.json` written to `out`."""
    import torch.distributed as dist

    from rollout import Sampling

    lengths = [prompt_length(processor, e) for e in examples]
    longest = max(lengths, default=0)
    max_tokens = fit_max_tokens(args.max_tokens, engine.max_model_len, longest)
    if max_tokens < 1:
        e = examples[lengths.index(longest)]
        raise SystemExit(f"{out}: example {e['id']} has a {longest}-token prompt, no room "
                         f"left in the {engine.max_model_len}-token context (--max_model_len)")  # fmt: skip
    if max_tokens < args.max_tokens and rank == 0:
        print(f"[eval] max_tokens {args.max_tokens} does not fit the {engine.max_model_len}-token "
              f"context after the longest prompt ({longest} tokens): using {max_tokens}",
              file=sys.stderr)  # fmt: skip
    sampling = Sampling(temperature=args.temperature, top_p=args.top_p, max_tokens=max_tokens)
    skipped: list[str] = []
    records = run(engine, processor, examples[rank::world], n=args.n, sampling=sampling,
                  direct=args.direct, sc_rounds=args.sc_rounds, skipped=skipped)  # fmt: skip
    n_skipped = len(skipped)
    if dist.is_initialized():
        gathered: list = [None] * world
        dist.all_gather_object(gathered, (records, n_skipped))
        records = [r for part, _ in gathered for r in part]
        n_skipped = sum(k for _, k in gathered)
    summary = summarize(records)
    summary["skipped_images"] = n_skipped
    summary.setdefault("acc@1", 0.0)
    summary.setdefault("acc@2", 0.0)
    if rank == 0:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "samples.jsonl"), "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
        with open(os.path.join(out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        plot(summary, out)
        if not args.table2:
            print(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
