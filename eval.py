"""Evaluate self-correction (arXiv 2602.08503, Tables 2-3 and Fig. 7): acc@1 (o1), acc@2 (the
final answer), c->w / w->c rates, how often the model corrects itself, sequential test-time
scaling (force K extra rounds by appending SC, Fig. 7a) and pass@k (Fig. 7b); Table 2 as
VLMEvalKit scores it (its prediction files and its judge-free metrics).

    python eval.py --model runs/demo/stage-2/export --data synthetic:256 --out runs/eval
    python eval.py --model runs/octopus-stage2/export --data MathVista_MINI.tsv --n 8
    torchrun --nproc_per_node=8 eval.py --model ... --data ... --sc_rounds 3   # data-parallel
    # Table 2: the seven benchmarks (VLMEvalKit TSVs in --bench_dir), scored as VLMEvalKit does
    torchrun --nproc_per_node=8 eval.py --table2 --model runs/octopus-8b/stage-2/export \
        --bench_dir data/benchmarks
    python eval.py --score runs/table2/WeMath/WeMath.tsv --benchmark WeMath --out DIR  # no model

Modes: default (the model decides whether to correct itself), `--direct` (stop at
`<self-correction>`: direct reasoning only), `--sc_rounds K` (after the model's answer, append
SC and continue, K times; one generate call per round). `--prompt octopus|baseline|none` picks
the suffix; `--instruct` evaluates an instruct model as Table 2's base row (no suffix, 4096 new
tokens, the full output as its prediction). Sampling defaults are the paper's: temperature 0.6,
top-p 0.95, no top-k, up to 16384 new tokens in a 32768-token context; both lengths are clamped
to what the model allows, with one line saying so. Images of VLMEvalKit TSVs keep the model
processor's own pixel range (VLMEvalKit's Qwen3-VL wrapper sets none); other files' are resized
into [256*28*28, 1280*28*28] pixels (the released inference setting); `--min_pixels`,
`--max_pixels` override both; the images of `synthetic:N` are used as drawn. Inputs: JSONL /
parquet / HF folders (data.py) and VLMEvalKit TSV files (index, base64 image, question, answer,
options A, B, ...). Images stay encoded until the prompts are rendered; a row whose image does
not decode is skipped, counted (`skipped_images` in the summary) and named on stderr. A
VLMEvalKit TSV also gets its predictions file; one of Table 2's datasets, its VLMEvalKit scores.
"""

from __future__ import annotations

import argparse
import ast
import csv
import json
import math
import os
import re
import string
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
from octopus import BASELINE_SUFFIX, OCTOPUS_SUFFIX, SC, SC_OPEN, split_rounds
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
# VLMEvalKit's scoring (open-compass/VLMEvalKit, read at e8e78f05), judge-free parts: pure
# functions over the rows of a predictions file (dicts of the TSV's columns and `prediction`)
# =============================================================================================

# How a row was graded (the `graded` column of scored.tsv)
RULE = "rule"  # VLMEvalKit's own rule decided the row: its score with a judge is the same
NEEDS_JUDGE = "needs judge: rule fallback"  # VLMEvalKit asks its judge here; no judge was given
NEVER = "never a hit in VLMEvalKit"  # its code grades the row wrong whatever a judge says

_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@",
          "`", ",", "?", "!"]  # fmt: skip
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
_PERIOD_STRIP = re.compile(r"(?<!\d)\.(?!\d)")
_REJECTS = ("Sorry, I can't help with images of people yet.", "I can't process this file.",
            "I'm sorry, but without the image provided", "Cannot determine the answer")  # fmt: skip
_OPTION_SEPARATORS = str.maketrans({c: " " for c in ".()[],:;!*#{}"})
_VERBOSE_ANSWER_RE = re.compile(r"(?i)(?:correct\s+)?answer\s+is\s+\**([ABCD])\**")


def process_punctuation(text: str) -> str:
    """vlmeval/smp/misc.py, process_punctuation."""
    out = text
    digit_comma = _COMMA_STRIP.search(text) is not None
    for p in _PUNCT:
        out = out.replace(p, "" if (p + " " in text or " " + p in text or digit_comma) else " ")
    # VLMEvalKit passes re.UNICODE (32) where sub() takes `count`: at most 32 periods go
    return _PERIOD_STRIP.sub("", out, count=32)


def yorn_extraction(output: str) -> str:
    """'Yes', 'No' or 'Unknown' (vlmeval/dataset/utils/yorn.py, YOrN_Extraction)."""
    words = process_punctuation(output.lower()).split()
    if "yes" in words and "no" not in words:
        return "Yes"
    if "yes" not in words and "no" in words:
        return "No"
    return "Unknown"


def can_infer_option(answer: str, choices: dict[str, str]) -> str | None:
    """The option letter an answer names, 'Z' for a refusal, None when it names none
    (vlmeval/utils/matching_util.py, can_infer_option; VERBOSE unset)."""
    if "Failed to obtain answer via API" in answer:
        return None
    if any(err in answer for err in _REJECTS):
        return "Z"
    splits = answer.translate(_OPTION_SEPARATORS).split()
    present = set(splits)
    count = sum(c in present for c in choices)
    if count == 1:
        for ch in choices:
            if ch in present and splits.index(ch) > len(splits) - 5:
                return ch
    elif count == 0 and "Z" in present:
        return "Z"
    match = _VERBOSE_ANSWER_RE.search(answer)
    if match and match.group(1).upper() in choices:
        return match.group(1).upper()
    return None


def can_infer_text(answer: str, choices: dict[str, str]) -> str | None:
    """The one option whose text the answer contains (vlmeval/utils/matching_util.py,
    can_infer_text)."""
    answer = answer.lower()
    if len(answer) > 2 * sum(len(str(v)) for v in choices.values()):
        return None
    found = [k for k, v in choices.items() if str(v).lower() in answer]
    return found[0] if len(found) == 1 else None


def can_infer(answer: str, choices: dict[str, str]) -> str | None:
    """vlmeval/utils/matching_util.py, can_infer: the letter, then the option text."""
    answer = str(answer)
    return can_infer_option(answer, choices) or can_infer_text(answer, choices)


def build_choices(row: dict) -> dict[str, str]:
    """Options A..Z that the row gives (vlmeval/dataset/utils/multiple_choice.py,
    build_choices)."""
    return {L: row[L] for L in string.ascii_uppercase if _given(row.get(L))}


def vlmevalkit_prediction(response: str) -> str:
    """The content of the last `\\boxed{` (to its closing brace, else to the end), or the whole
    response when it has none (vlmeval/vlm/qwen3_vl/model.py, Qwen3VLChat post_process)."""
    rest = response.split("\\boxed{")[-1]
    depth = 1
    for i, ch in enumerate(rest):
        depth += (ch == "{") - (ch == "}")
        if depth == 0:
            return rest[:i]
    return rest if rest else response


def _literal(cell: str, where: str):
    """A Python literal of a cell (a list of choices, of skills); never evaluated as code."""
    try:
        return ast.literal_eval(cell)
    except (ValueError, SyntaxError):
        raise ValueError(f"{where}: not a Python literal: {cell[:80]!r}") from None


def grade_mcq(row: dict, prediction: str, answer: str | None = None) -> tuple[int, str]:
    """(hit, how) of a multiple-choice row: `can_infer` against the row's options; VLMEvalKit
    asks its judge when no letter can be read (vlmeval/dataset/utils/multiple_choice.py,
    extract_answer_from_item; without a judge it counts 'Z', a miss)."""
    got = can_infer(prediction, build_choices(row))
    if got is None:
        return 0, NEEDS_JUDGE
    return int(got == (row["answer"] if answer is None else answer)), RULE


def grade_mmmu(row: dict, prediction: str) -> tuple[int, str]:
    """An MMMU row: an open question becomes A = its answer, B = 'Other Answers', truth A
    (vlmeval/dataset/utils/multiple_choice.py, MMMU_preproc and mcq_vanilla_eval)."""
    row = dict(row)
    if not _given(row.get("A")):
        row["A"], row["B"] = row["answer"], "Other Answers"
    answer = row["answer"] if row["answer"] in set(string.ascii_uppercase) else "A"
    return grade_mcq(row, prediction, answer)


def grade_mathvista(row: dict, prediction: str, where: str = "") -> tuple[int, str]:
    """A MathVista row (vlmeval/dataset/utils/mathvista.py, post_check with prefetch, then
    MathVista_acc): multiple-choice rows against `answer_option` by `can_infer` over `choices`
    (the TSV's `answer` is the option's text); integer / float rows by value; other answer types
    never hit (post_check compares str(None) with the answer)."""
    if row.get("question_type") == "multi_choice":
        choices = _literal(row.get("choices") or "", f"{where}: field choices")
        letters = {chr(65 + i): str(v) for i, v in enumerate(choices)}
        got = can_infer(prediction, letters)
        if got is None:
            return 0, NEEDS_JUDGE
        return int(got == row["answer_option"]), RULE
    kind = {"integer": int, "float": float}.get(row.get("answer_type", ""))
    if kind is None:
        return 0, NEVER
    try:
        if kind(prediction) == kind(row["answer"]):
            return 1, RULE
    except ValueError:
        pass
    # VLMEvalKit's judge extracts an answer here; without one, ours is graded by reward.py
    return int(_equivalent(prediction, row["answer"])), NEEDS_JUDGE


def grade_mathverse(row: dict, prediction: str) -> tuple[int, str]:
    """A MathVerse row: the extracted answer equal to `answer` (vlmeval/dataset/utils/
    mathverse.py, post_check_score); else VLMEvalKit's judge decides. VLMEvalKit's judge also
    does the extraction (MathVerse_auxeval_extract); here the last box is the extraction."""
    if prediction.strip() == str(row["answer"]).strip():
        return 1, RULE
    return int(_equivalent(prediction, row["answer"])), NEEDS_JUDGE


def grade_yorn(row: dict, prediction: str) -> tuple[int, str]:
    """A yes / no row (vlmeval/dataset/image_yorn.py, ImageYORNDataset.evaluate): 'Unknown'
    goes to the judge, and without one is a miss."""
    got = yorn_extraction(prediction)
    if got == "Unknown":
        return 0, NEEDS_JUDGE
    return int(got == row["answer"]), RULE


def grade_charxiv(row: dict, prediction: str) -> tuple[int, str]:
    """A CharXiv row: VLMEvalKit's judge grades every row with its `grading_query`
    (vlmeval/dataset/charxiv.py, auxeval); without one, reward.py's equivalence."""
    return int(_equivalent(prediction, row["answer"])), NEEDS_JUDGE


def _equivalent(prediction: str, answer) -> bool:
    return bool(prediction.strip()) and is_equivalent(prediction, str(answer))


def _pct(hits: list[int]) -> float:
    return 100 * sum(hits) / len(hits) if hits else 0.0


def _by(rows: list[dict], key) -> dict[str, list[int]]:
    """Hits grouped by `key(row)`, or by the column named `key`."""
    groups: dict[str, list[int]] = defaultdict(list)
    for r in rows:
        groups[r[key] if isinstance(key, str) else key(r)].append(r["hit"])
    return groups


def mathvista_metrics(rows: list[dict]) -> dict[str, float]:
    """acc (%) Overall, per `task` and per skill (vlmeval/dataset/utils/mathvista.py,
    MathVista_acc)."""
    out = {"Overall": _pct([r["hit"] for r in rows])}
    if all(_given(r.get("task")) for r in rows):
        out |= {k: _pct(v) for k, v in sorted(_by(rows, "task").items())}
    skills: dict[str, list[int]] = defaultdict(list)
    for r in rows:
        if _given(r.get("skills")):
            try:
                names = ast.literal_eval(r["skills"])
            except (ValueError, SyntaxError):
                names = [r["skills"]]
            for s in names if isinstance(names, list) else [names]:
                skills[str(s)].append(r["hit"])
    return out | {k: _pct(v) for k, v in sorted(skills.items())}


def mathverse_metrics(rows: list[dict]) -> dict[str, float]:
    """acc (%) over all rows ('Overall') and per problem version (vlmeval/dataset/utils/
    mathverse.py, MathVerse_acc: one row per version, read from `metadata`). MathVerse_MINI's
    five versions hold 788 rows each, so 'Overall' is also the mean of the five."""
    out = {"Overall": _pct([r["hit"] for r in rows])}
    versions: dict[str, list[int]] = defaultdict(list)
    for r in rows:
        if _given(r.get("metadata")):
            try:  # VLMEvalKit: metadata.replace("'", '"') then json.loads
                meta = json.loads(r["metadata"].replace("'", '"'))
            except json.JSONDecodeError:
                continue
            if isinstance(meta, dict) and "problem_version" in meta:
                versions[str(meta["problem_version"])].append(r["hit"])
    return out | {k: _pct(v) for k, v in sorted(versions.items())}


def mcq_metrics(rows: list[dict]) -> dict[str, float]:
    """Overall and per `l2-category` / `category` accuracy (%) (vlmeval/dataset/utils/
    multiple_choice.py, report_acc; VLMEvalKit prints fractions)."""
    out = {"Overall": _pct([r["hit"] for r in rows])}
    for group in ("l2-category", "category"):
        if rows and all(_given(r.get(group)) for r in rows):
            out |= {k: _pct(v) for k, v in sorted(_by(rows, group).items())}
    return out


def hallusion_metrics(rows: list[dict]) -> dict[str, float]:
    """aAcc (per question), fAcc (a figure counts when all its questions are right), qAcc (a
    question counts when it is right on all its figures) in %, overall and per `category` /
    `l2-category`, and their mean (vlmeval/dataset/utils/yorn.py, Hallusion_rating: set,
    figure and question ids are fields 3, 4, 5 of `index` split at '_')."""

    def three(sub: list[dict]) -> dict[str, float]:
        def all_right(field: int) -> float:
            groups = _by(sub, lambda r: f"{r['l2-category']}_{r['_ids'][0]}_{r['_ids'][field]}")
            return 100 * sum(all(v) for v in groups.values()) / len(groups)

        return {"aAcc": _pct([r["hit"] for r in sub]), "fAcc": all_right(1),
                "qAcc": all_right(2)}  # fmt: skip

    for r in rows:
        parts = str(r["index"]).split("_")
        if len(parts) < 6 or "l2-category" not in r:
            raise ValueError(f"HallusionBench row {r['index']}: needs an index of 6 '_' fields "
                             "(..._set_figure_question) and an l2-category")  # fmt: skip
        r["_ids"] = (parts[3], parts[4], parts[5])
    overall = three(rows)
    out = {"Overall (mean of aAcc, fAcc, qAcc)": sum(overall.values()) / 3, **overall}
    for group in ("category", "l2-category"):
        for value in sorted({r[group] for r in rows if _given(r.get(group))}):
            sub = three([r for r in rows if r.get(group) == value])
            out |= {f"{value} {k}": v for k, v in sub.items()}
    for r in rows:
        del r["_ids"]
    return out


WEMATH_PROBLEMS = 525  # the full set's multi-step problems: VLMEvalKit's fixed denominator


def wemath_metrics(rows: list[dict]) -> dict[str, float | None]:
    """WeMath's four dimensions over its multi-step problems (vlmeval/dataset/utils/wemath.py,
    evaluate_calculate_metrics, evaluate_compute_final_scores, evaluate_update_main_results_df):
    a problem (one `ID`) has its one-step sub-questions (`key` '2steps_1', '2steps_2' or
    '3steps_1'..'3steps_3') and the whole question ('2steps_multi' / '3steps_multi').
    IK: a step wrong and the whole wrong; IG: every step right, the whole wrong; CM: steps
    right (Loose: any, Strict: all) and the whole right; RM: steps wrong (Loose: all, Strict:
    any) and the whole right. A sub-question missing from the file is neither right nor wrong.
    IK, IG, CM are counts / 525, RM is RM / (CM + RM); Score = (525 - IG / 2 - RM - IK) / 525.
    """
    hits: dict[tuple[str, str], bool] = {}
    for r in rows:
        key = (str(r["key"]), str(r["ID"]))
        if key in hits:
            raise ValueError(f"WeMath: key {key[0]} of ID {key[1]} appears twice")
        hits[key] = bool(r["hit"])
    counts = dict.fromkeys(("IK", "IG", "CM_loose", "CM_strict", "RM_loose", "RM_strict"), 0)
    for steps in (2, 3):
        for ids in sorted({i for k, i in hits if k == f"{steps}steps_1"}):
            step = [hits.get((f"{steps}steps_{j}", ids)) for j in range(1, steps + 1)]
            whole = hits.get((f"{steps}steps_multi", ids))
            all_right = all(s is True for s in step)
            any_right = any(s is True for s in step)
            all_wrong = all(s is False for s in step)
            any_wrong = any(s is False for s in step)
            if whole is True:
                counts["CM_loose"] += any_right
                counts["CM_strict"] += all_right
                counts["RM_loose"] += all_wrong
                counts["RM_strict"] += any_wrong
            elif whole is False:
                counts["IG"] += all_right
                counts["IK"] += any_wrong
    n = WEMATH_PROBLEMS
    out = {}
    for mode in ("Strict", "Loose"):
        cm, rm = counts[f"CM_{mode.lower()}"], counts[f"RM_{mode.lower()}"]
        out[f"Score ({mode})"] = 100 * (n - 0.5 * counts["IG"] - rm - counts["IK"]) / n
        out[f"InsufficientKnowledge ({mode})"] = 100 * counts["IK"] / n
        out[f"InadequateGeneralization ({mode})"] = 100 * counts["IG"] / n
        out[f"CompleteMastery ({mode})"] = 100 * cm / n
        # VLMEvalKit divides by zero here when no problem has its whole question right
        out[f"RoteMemorization ({mode})"] = 100 * rm / (cm + rm) if cm + rm else None
    out |= {f"count {k}": float(v) for k, v in counts.items()}
    return out


def charxiv_metrics(rows: list[dict]) -> dict[str, float]:
    """Overall and per reasoning category (`inst_category` 1-4) in % (vlmeval/dataset/
    charxiv.py, CharXiv.get_scores and qid2category)."""
    names = {"1": "Text-in-Chart", "2": "Text-in-General", "3": "Number-in-Chart",
             "4": "Number-in-General"}  # fmt: skip
    out = {"Overall": _pct([r["hit"] for r in rows])}
    cats = _by(rows, lambda r: names.get(str(r.get("inst_category", "")).split(".")[0], "?"))
    return out | {k: _pct(v) for k, v in sorted(cats.items()) if k != "?"}


# Per VLMEvalKit dataset: how a row is graded, the metrics, the one the paper reports, and the
# judge VLMEvalKit's run.py uses by default (run.py, get_judge_kwargs)
BENCHMARKS: dict[str, dict] = {
    "MathVista_MINI": dict(grade=grade_mathvista, metrics=mathvista_metrics, score="Overall",
                           judge="gpt-4o-mini"),
    "MathVerse_MINI": dict(grade=grade_mathverse, metrics=mathverse_metrics, score="Overall",
                           judge="gpt-4o-mini"),
    "WeMath": dict(grade=grade_mcq, metrics=wemath_metrics, score="Score (Loose)",
                   judge="gpt-4o-mini"),
    "HallusionBench": dict(grade=grade_yorn, metrics=hallusion_metrics,
                           score="Overall (mean of aAcc, fAcc, qAcc)", judge="gpt-4o-mini"),
    "MMStar": dict(grade=grade_mcq, metrics=mcq_metrics, score="Overall", judge="gpt-4o-mini"),
    "MMMU_DEV_VAL": dict(grade=grade_mmmu, metrics=mcq_metrics, score="Overall",
                         judge="gpt-4o-mini", split="validation"),
    "CharXiv_reasoning_val": dict(grade=grade_charxiv, metrics=charxiv_metrics, score="Overall",
                                  judge="gpt-4o-mini"),
}  # fmt: skip
REQUIRED_COLUMNS = {
    "MathVista_MINI": ("index", "answer", "question_type", "answer_type"),
    "MathVerse_MINI": ("index", "answer"),
    "WeMath": ("index", "answer", "key", "ID"),
    "HallusionBench": ("index", "answer", "l2-category"),
    "MMStar": ("index", "answer"),
    "MMMU_DEV_VAL": ("index", "answer", "split"),
    "CharXiv_reasoning_val": ("index", "answer", "grading_query"),
}


def score_rows(benchmark: str, rows: list[dict], column: str = "prediction") -> dict:
    """Grade every row's `column` as VLMEvalKit does for `benchmark` and aggregate: `hit` and
    `graded` are set on each row; returns {"score", "metric", "metrics", "judge", "rows",
    "needs_judge", "never", "left_out"}. `score` is the paper's metric (%); rows VLMEvalKit
    sends to a judge are graded by rule and counted in `needs_judge` (no judge is built here).
    """
    spec = BENCHMARKS[benchmark]
    kept = [r for r in rows if spec.get("split") is None or r.get("split") == spec["split"]]
    for k, r in enumerate(kept):
        prediction = str(r.get(column) or "")
        if spec["grade"] is grade_mathvista:
            hit, how = grade_mathvista(r, prediction, f"row {k + 1} (index {r.get('index')})")
        else:
            hit, how = spec["grade"](r, prediction)
        r["hit"], r["graded"] = hit, how
    metrics = spec["metrics"](kept) if kept else {}
    return {"score": metrics.get(spec["score"], 0.0), "metric": spec["score"],
            "metrics": metrics, "judge": None, "papers_judge": spec["judge"],
            "rows": len(kept), "left_out": len(rows) - len(kept),
            "needs_judge": sum(r["graded"] == NEEDS_JUDGE for r in kept),
            "never": sum(r["graded"] == NEVER for r in kept)}  # fmt: skip


def read_predictions(path: str) -> list[dict]:
    """The rows of a VLMEvalKit-format predictions TSV (ours or VLMEvalKit's own)."""
    csv.field_size_limit(sys.maxsize)
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if rows and "prediction" not in rows[0]:
        raise DataError(f"{path}: no `prediction` column (columns: {', '.join(rows[0])})")
    return rows


def write_tsv(path: str, rows: list[dict]) -> None:
    """Rows as a TSV with the union of their columns, in first-seen order."""
    columns: dict[str, None] = {}
    for r in rows:
        columns |= dict.fromkeys(r)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(columns), delimiter="\t", extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def score_file(path: str, benchmark: str, out: str) -> dict:
    """`eval.py --score`: a predictions file scored as VLMEvalKit scores `benchmark`, into
    `out/summary.json` and `out/scored.tsv` (its rows with `hit` and `graded`). With a
    `prediction_o1` column, the same metrics of o1's answers go under `o1`."""
    rows = read_predictions(path)
    missing = [c for c in REQUIRED_COLUMNS[benchmark] if rows and c not in rows[0]]
    if missing:
        raise DataError(f"{path}: {benchmark} needs the column(s) {', '.join(missing)}")
    try:
        summary = {"benchmark": benchmark, "file": path, **score_rows(benchmark, rows)}
        if rows and "prediction_o1" in rows[0]:
            o1 = score_rows(benchmark, [dict(r) for r in rows], column="prediction_o1")
            summary["o1"] = {k: o1[k] for k in ("score", "metrics", "needs_judge")}
    except (ValueError, KeyError) as e:
        raise DataError(f"{path}: {e}") from None
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    write_tsv(os.path.join(out, "scored.tsv"), rows)
    return summary


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
    dataset: str | None = None,
    report: LoadReport | None = None,
) -> list[dict]:
    """A VLMEvalKit benchmark TSV -> examples (images encoded, resized into `[min_pixels,
    max_pixels]` when decoded). Columns as VLMEvalKit's TSVs have them (vlmeval/dataset/
    image_base.py, image_mcq.py): `index`, `image` (base64; a short cell names the `index` of
    the row holding the same image; a list literal `['b64', ...]` holds several images),
    `question`, `answer`, optional `hint`, options `A`, `B`, ..., `category`, `split`. With
    options the prompt is VLMEvalKit's multiple-choice prompt (image_mcq.py, ImageMCQDataset.
    build_prompt: "Hint:", "Question:", "Options:" with one "A. ..." line each, then the
    instruction to select; `dataset` "WeMath" leaves that instruction out, WeMath.build_prompt);
    without, the question alone. `dataset` "MMMU_DEV_VAL" places each image at its `<image N>`
    marker (MMMUDataset.split_MMMU). `split` keeps only rows of that split (MMMU_DEV_VAL holds
    "dev" and "validation"). Each example keeps its row without the image (`row`: the columns
    of a VLMEvalKit predictions file). A bad row is skipped and named in `report`."""
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
                                         min_pixels, max_pixels, dataset))  # fmt: skip
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


def interleave_images(text: str, images: list) -> list[dict]:
    """Content with each image at its `<image N>` marker, markers removed, images no marker
    names dropped (vlmeval/dataset/image_mcq.py, MMMUDataset.split_MMMU); without markers the
    images first, then the text. Raises ValueError for a marker naming no image."""
    segments = text.split("<image ")
    if len(segments) == 1:
        return [*({"type": "image", "image": im} for im in images), {"type": "text", "text": text}]
    content = [{"type": "text", "text": segments[0]}]
    for seg in segments[1:]:
        if len(seg) < 2 or not seg[0].isdigit() or seg[1] != ">":
            raise ValueError(f"a marker that is not <image N>: <image {seg[:12]!r}")
        if not 1 <= int(seg[0]) <= len(images):
            raise ValueError(f"<image {seg[0]}> but the row has {len(images)} image(s)")
        content += [{"type": "image", "image": images[int(seg[0]) - 1]},
                    {"type": "text", "text": seg[2:]}]  # fmt: skip
    return [c for c in content if c["type"] == "image" or c["text"]]


def _tsv_example(row: dict, where: str, by_index: dict, suffix: str, min_pixels: int,
                 max_pixels: int, dataset: str | None = None) -> dict:  # fmt: skip
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
        if dataset != "WeMath":
            # VLMEvalKit's line ends in " \n"; dropped, as every suffix starts on a new line
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
    text = question + suffix
    if dataset == "MMMU_DEV_VAL":
        try:
            content = interleave_images(text, images)
        except ValueError as e:
            raise DataError(f"{where}: field question: {e}") from None
    else:
        content = [{"type": "image", "image": im} for im in images]
        content.append({"type": "text", "text": text})
    example = {"id": str(row.get("index") or where), "messages": [{"role": "user", "content": content}],
               "answer": str(row["answer"]).strip(),
               "row": {k: v for k, v in row.items() if k != "image" and k is not None}}  # fmt: skip
    if _given(row.get("category")):
        example["category"] = row["category"]
    return example


def load_eval_data(
    spec: str,
    *,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
    split: str | None = None,
    suffix: str = OCTOPUS_SUFFIX,
) -> list[dict]:
    """`synthetic:N`, a VLMEvalKit `.tsv` (rows of `split` only, when given; the file's name is
    its VLMEvalKit dataset), or anything data.py loads; bad rows are reported on stderr."""
    if (n := synthetic_size(spec)) is not None:
        return synthetic_task(n, seed=12345, suffix=suffix)
    if spec.endswith(".tsv"):
        report = LoadReport()
        dataset = os.path.basename(spec)[: -len(".tsv")]
        examples = load_vlmevalkit_tsv(spec, min_pixels=min_pixels, max_pixels=max_pixels,
                                       split=split, report=report, suffix=suffix,
                                       dataset=dataset)  # fmt: skip
    else:
        examples, report = load_examples(spec, min_pixels=min_pixels, max_pixels=max_pixels,
                                         suffix=suffix)  # fmt: skip
    if report.skipped:
        print(f"[eval] {spec}: {report.summary()}", file=sys.stderr)
    return examples


# =============================================================================================
# Running the model
# =============================================================================================


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
    # one state per sample: [example k, text, tokens per round, tokens in the context]
    states = []
    for k, group in enumerate(groups):
        for g in group:
            text = g.text.split(SC_OPEN)[0].rstrip("<").rstrip() if direct else g.text
            states.append([k, text, [len(g.ids)], len(g.ids)])
    if sc_rounds:
        prompt_lens = [prompt_length(processor, e) for e in examples]
        sc_len = len(processor.tokenizer(SC, add_special_tokens=False)["input_ids"])
    for _ in range(sc_rounds):  # Fig. 7a: append exactly SC after the last answer
        # one generate call per round for every sample that still fits its context
        fits = [prompt_lens[s[0]] + s[3] + sc_len + CONTEXT_MARGIN < engine.max_model_len
                for s in states]  # fmt: skip
        for s, ok in zip(states, fits, strict=True):
            if not ok:
                s[2].append(0)  # the context is full: nothing more to force
        going = [s for s, ok in zip(states, fits, strict=True) if ok]
        if not going:
            continue
        prefixes = [s[1].rstrip() + SC for s in going]
        more = engine.generate([prompts[s[0]] for s in going], 1, sampling, prefixes=prefixes)
        for s, prefix, (g,) in zip(going, prefixes, more, strict=True):
            s[1] = prefix + g.text
            s[2].append(len(g.ids))
            s[3] += sc_len + len(g.ids)
    records = []
    for sample, (k, text, round_tokens, _) in enumerate(states):
        e = examples[k]
        rec = {"id": e["id"], "sample": sample % n, "response": text, "truth": e["answer"],
               "tokens": sum(round_tokens), "rounds": grade_rounds(text, e["answer"])}  # fmt: skip
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
# (column, VLMEvalKit dataset = the TSV's name in --bench_dir, the rows kept). The datasets are
# VLMEvalKit's (vlmeval/dataset: image_vqa.py MathVista / MathVerse, image_mcq.py WeMath / MMStar
# / MMMUDataset, image_yorn.py HallusionBench, charxiv.py), files as its DATASET_URL serves them
# (README "Getting the data"). MathVerse: MathVerse_MINI, its five versions (the paper's
# Appendix B, Table 5); MMMU: the validation rows of MMMU_DEV_VAL.
TABLE2 = (
    ("MathVista", "MathVista_MINI", None),
    ("MathVerse", "MathVerse_MINI", None),
    ("WeMath", "WeMath", None),
    ("HallusionBench", "HallusionBench", None),
    ("MMStar", "MMStar", None),
    ("MMMU-val", "MMMU_DEV_VAL", "validation"),
    ("CharXiv-RQ", "CharXiv_reasoning_val", None),
)


def prediction_rows(examples: list[dict], records: list[dict], sample: int,
                    instruct: bool = False) -> list[dict]:  # fmt: skip
    """One sample index's rows of a VLMEvalKit predictions file: each example's TSV columns
    (no image) in file order, `prediction` (the final answer as VLMEvalKit's Qwen3-VL wrapper
    post-processes it: `vlmevalkit_prediction`; an instruct model's full output),
    `prediction_o1` (o1's, for acc@1) and `response` (the full text). Examples without a
    record (an image that did not decode) are left out."""
    by_id = {r["id"]: r for r in records if r.get("sample", 0) == sample}
    rows = []
    for e in examples:
        rec = by_id.get(e["id"])
        if rec is None:
            continue
        text = rec["response"]
        o1 = split_rounds(text)[0]
        rows.append({**e.get("row", {"index": e["id"], "answer": e["answer"]}),
                     "prediction": text if instruct else vlmevalkit_prediction(text),
                     "prediction_o1": o1 if instruct else vlmevalkit_prediction(o1),
                     "response": text})  # fmt: skip
    return rows


def column_label(name: str, summary: dict) -> str:
    """A Table 2 column: the benchmark, its metric, and whether a judge was needed and had."""
    judged = "no judge needed" if summary["needs_judge"] == 0 else (
        f"{summary['needs_judge']} rows need {summary['papers_judge']}, graded by rule: "
        "not the paper's measure")  # fmt: skip
    return f"{name} {summary['metric']} ({judged})"


def table2_rows(summaries: dict[str, dict]) -> str:
    """Table 2's layout: one column per benchmark (its VLMEvalKit metric and judge status) and
    the average; rows acc@1 (o1's answers) and acc@2 (the final answers), in %."""
    names = [name for name, _, _ in TABLE2 if name in summaries]
    labels = [column_label(name, summaries[name]) for name in names]
    lines = ["| | " + " | ".join(labels) + " | Avg |", "|---" * (len(names) + 2) + "|"]
    for key in ("acc@1", "acc@2"):
        values = [summaries[name][key.replace("acc", "score")] for name in names]
        cells = [f"{v:.1f}" for v in values] + [f"{sum(values) / len(values):.1f}"]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="", help="HF checkpoint folder (or hub id)")
    ap.add_argument(
        "--data", default="", help="JSONL / parquet / HF folder / VLMEvalKit .tsv / synthetic:N"
    )
    ap.add_argument("--table2", action="store_true",
                    help="evaluate the seven benchmarks of Table 2 (TSVs in --bench_dir): "
                    "VLMEvalKit prediction files, their scores and the table")  # fmt: skip
    ap.add_argument("--bench_dir", default="data/benchmarks",
                    help="--table2: the folder of VLMEvalKit TSVs (README \"Getting the data\")")  # fmt: skip
    ap.add_argument("--score", default="",
                    help="re-score a VLMEvalKit-format predictions TSV (no model is loaded)")  # fmt: skip
    ap.add_argument("--benchmark", choices=sorted(BENCHMARKS),
                    help="--score: the VLMEvalKit dataset the file holds")  # fmt: skip
    ap.add_argument("--out", default="runs/eval", help="samples.jsonl, summary.json, plots")
    ap.add_argument("--prompt", choices=("octopus", "baseline", "none"), default=None,
                    help="the suffix after each question: Octopus' (default), the baselines' "
                    "(EasyR1's think / boxed prompt), or none (default with --instruct)")  # fmt: skip
    ap.add_argument("--instruct", action="store_true",
                    help="an instruct model as Table 2's base row: no suffix, 4096 new tokens, "
                    "the full output is the prediction")  # fmt: skip
    ap.add_argument("--n", type=int, default=1, help="samples per prompt (pass@k up to n)")
    ap.add_argument("--direct", action="store_true", help="stop at <self-correction>")
    ap.add_argument("--sc_rounds", type=int, default=0, help="force K extra correction rounds")
    ap.add_argument("--temperature", type=float, default=0.6)
    ap.add_argument("--top_p", type=float, default=0.95)
    ap.add_argument("--max_tokens", type=int, default=None,
                    help="new tokens per round (16384; 4096 with --instruct)")  # fmt: skip
    ap.add_argument("--max_model_len", type=int, default=32768, help="the engine's context")
    ap.add_argument("--min_pixels", type=int, default=None,
                    help="smallest image area (VLMEvalKit TSVs: the model's processor's own, "
                    f"as VLMEvalKit's Qwen3-VL wrapper; else {MIN_PIXELS})")  # fmt: skip
    ap.add_argument("--max_pixels", type=int, default=None,
                    help=f"largest image area (the same; else {MAX_PIXELS})")  # fmt: skip
    ap.add_argument("--limit", type=int, default=0,
                    help="only the first N examples (0: all); --table2: of each benchmark")  # fmt: skip
    ap.add_argument("--kv_cache_gb", type=float, default=1.0, help="CPU only: KV-cache size")
    args = ap.parse_args(argv)
    if args.score:
        if not args.benchmark:
            ap.error("--score needs --benchmark (the VLMEvalKit dataset of the file)")
        return args
    if not args.model:
        ap.error("--model is required (or --score FILE --benchmark NAME)")
    if not args.table2 and not args.data:
        ap.error("--data is required (or --table2 with --bench_dir)")
    args.prompt = args.prompt or ("none" if args.instruct else "octopus")
    if args.max_tokens is None:
        args.max_tokens = 4096 if args.instruct else 16384
    return args


SUFFIXES = {"octopus": OCTOPUS_SUFFIX, "baseline": BASELINE_SUFFIX, "none": ""}


def image_range(args: argparse.Namespace) -> dict[str, int]:
    """--min_pixels / --max_pixels, or for VLMEvalKit TSVs the model's processor's own range:
    VLMEvalKit's Qwen3-VL wrapper sets none (vlmeval/vlm/qwen3_vl/model.py, Qwen3VLChat
    _prepare_content), so its images reach the processor at its defaults."""
    if args.table2 or args.data.endswith(".tsv"):
        from transformers import AutoImageProcessor

        own = AutoImageProcessor.from_pretrained(args.model).size
        low, high = own["shortest_edge"], own["longest_edge"]
    else:
        low, high = MIN_PIXELS, MAX_PIXELS
    return {"min_pixels": args.min_pixels or low, "max_pixels": args.max_pixels or high}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)  # first: `--help` loads nothing
    if args.score:  # no model, no engine: the predictions file alone
        try:
            summary = score_file(args.score, args.benchmark, args.out)
        except (DataError, OSError) as e:
            raise SystemExit(f"[eval] --score: {e}") from None
        print(json.dumps({k: v for k, v in summary.items() if k != "metrics"}, indent=1))
        return summary
    if args.table2:
        missing = [f"{d}.tsv" for _, d, _ in TABLE2
                   if not os.path.isfile(os.path.join(args.bench_dir, f"{d}.tsv"))]  # fmt: skip
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
    pixels = image_range(args)
    suffix = SUFFIXES[args.prompt]
    if args.table2:  # every benchmark loaded first (images encoded): one engine sized for all
        sets = {name: load_eval_data(os.path.join(args.bench_dir, f"{d}.tsv"), split=split,
                                     suffix=suffix, **pixels)
                for name, d, split in TABLE2}  # fmt: skip
    else:
        sets = {"": load_eval_data(args.data, suffix=suffix, **pixels)}
    if args.limit:
        sets = {name: examples[: args.limit] for name, examples in sets.items()}
    processor = AutoProcessor.from_pretrained(args.model)
    every = [e for examples in sets.values() for e in examples]
    engine = VLLMEngine(args.model, max_model_len=args.max_model_len, seed=rank,
                        kv_cache_gb=args.kv_cache_gb, max_images=max_images_of(every),
                        **pixels)  # fmt: skip
    summaries = {}
    datasets = {name: d for name, d, _ in TABLE2}
    for name, examples in sets.items():
        out = os.path.join(args.out, name) if name else args.out
        dataset = datasets[name] if name else os.path.basename(args.data)[: -len(".tsv")]
        summaries[name] = evaluate(engine, processor, examples, args, out, rank, world, dataset)
    if args.table2 and rank == 0:
        table = table2_rows(summaries)
        keys = ("dataset", "metric", "score@1", "score@2", "judge", "papers_judge", "needs_judge",
                "rows", "samples", "skipped_images", "prediction_files")  # fmt: skip
        with open(os.path.join(args.out, "table2.json"), "w") as f:
            json.dump({name: {k: s.get(k) for k in keys} for name, s in summaries.items()}, f,
                      indent=1)  # fmt: skip
        with open(os.path.join(args.out, "table2.md"), "w") as f:
            f.write(table + "\n")
        print(table)
    engine.close()
    if dist.is_initialized():
        dist.destroy_process_group()
    return summaries if args.table2 else summaries[""]


def evaluate(engine, processor, examples, args, out: str, rank: int, world: int,
             dataset: str = "") -> dict:  # fmt: skip
    """One data set: the response budget fitted to its longest prompt, this rank's share sampled
    and graded, records gathered, `samples.jsonl` and `summary.json` written to `out`. A
    VLMEvalKit TSV also gets its predictions file(s) (`<dataset>.tsv`, with --n > 1 one per
    sample index: `<dataset>_<k>.tsv`) and, for a dataset of Table 2, their VLMEvalKit scores
    (`score/` or `score_<k>/`; the summary's `vlmevalkit`, `score@1`, `score@2`)."""
    import torch.distributed as dist

    from rollout import Sampling, fit_max_tokens

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
        if examples and "row" in examples[0]:
            summary |= write_and_score(examples, records, args, out, dataset)
        with open(os.path.join(out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        plot(summary, out)
        if not args.table2:
            print(json.dumps(summary, indent=1))
    return summary


def write_and_score(examples, records, args, out: str, dataset: str) -> dict:
    """The predictions file of each sample index and, for a dataset VLMEvalKit scores here, its
    scores: `score@1` / `score@2`, the VLMEvalKit metric (%) of o1's / the final answers, the
    mean over the files (acc@1 / acc@2 stay reward.py's grading of the same answers)."""
    files = []
    for k in range(args.n):
        path = os.path.join(out, f"{dataset}.tsv" if args.n == 1 else f"{dataset}_{k}.tsv")
        write_tsv(path, prediction_rows(examples, records, k, args.instruct))
        files.append(path)
    extra: dict = {"dataset": dataset, "prediction_files": files}
    if dataset not in BENCHMARKS:
        return extra
    try:
        scores = [score_file(p, dataset, os.path.join(out, "score" if args.n == 1 else f"score_{k}"))
                  for k, p in enumerate(files)]  # fmt: skip
    except DataError as e:  # the predictions are written: `--score` re-scores them once fixed
        raise SystemExit(f"[eval] scoring {dataset}: {e}") from None
    first = scores[0]
    extra |= {"vlmevalkit": scores, "metric": first["metric"], "judge": None,
              "papers_judge": first["papers_judge"], "rows": first["rows"],
              "needs_judge": sum(s["needs_judge"] for s in scores),
              "score@2": sum(s["score"] for s in scores) / len(scores),
              "score@1": sum(s["o1"]["score"] for s in scores) / len(scores)}  # fmt: skip
    return extra


if __name__ == "__main__":
    main()
