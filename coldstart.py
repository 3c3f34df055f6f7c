"""Cold-start data by mixed sampling (arXiv 2602.08503, Sec. 4.1): four o1 per input from the
policy; 4k inputs whose four o1 are all correct and 6k whose o1 are mixed (no all-wrong input);
for each kept input one o2 from a stronger model given the question, the ground truth and one
of its o1; rows `o1 + SC + o2` that `train.py --stage sft` trains on.

    torchrun --nproc_per_node=8 coldstart.py --policy Qwen/Qwen3-VL-8B-Instruct \\
        --strong Qwen/Qwen3-VL-30B-A3B-Instruct --data data/llava-cot/train-chosen.jsonl \\
        --out data/coldstart.jsonl --phase o1 --judge Qwen/Qwen3-VL-8B-Instruct
    python coldstart.py ... --phase o2 --tensor_parallel 2      # the strong model, TP 2
    python coldstart.py llava-cot --dir data/llava-cot           # rows first, then their images

Selection (the pure functions below): inputs are taken in a seeded random order, in rounds,
until `--inputs` (10,000) can be filled 4 : 6; `select_inputs` keeps the first all-correct and
the first mixed inputs in that order; the summary says how many inputs that took. One row per
kept input, as the paper counts 10k samples (`chosen_o1`): a mixed input's first wrong o1 (its
row teaches w->c, the correction the cold start exists for), an all-correct input's first o1
(c->c: keep a right answer). The o2 must be well-formed and correct, or the input is dropped.

Truths that can be checked: by default only the release's image sources (`SOURCES`); a truth
that is not a short answer (`rule_gradable`) is graded by `--judge` with the release's
consistency prompt, or, without a judge, its input is dropped and counted, never scored.

Phases: `--phase all` runs both in one launch; `o1` writes `<out>.o1.jsonl` (the kept inputs
and their chosen o1) and `o2` reads it. Under torchrun each rank samples its share with its own
engine (data parallel); one file is written. vLLM 0.32 runs tensor parallelism either with its
own worker processes (`mp` executor: one `python` process; the release's SFT/
sft_mixed_sampling.py, `tensor_parallel_size=2`) or under torchrun, where the ranks of a TP
group must send identical prompts (vllm/v1/executor/uniproc_executor.py,
`ExecutorWithExternalLauncher`); rollout.py refuses the latter, so the strong model with
`--tensor_parallel` > 1 runs as its own `python` launch (`--phase o2`).

Sampling defaults are the release's (DripNowhy/Octopus, SFT/sft_in_dis_sampling.py and
SFT/construct.sh): o1 with the plain prompt at T 0.6, top-p 0.9, top-k 20, 2048 tokens; o2 at
T 0.7, top-p 1.0, 4096 tokens; the judge greedy, 20 tokens. Images in [256*28*28, 1280*28*28].
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import math
import os
import random
import re
import sys
from collections.abc import Callable

from config import MAX_PIXELS, MIN_PIXELS
from data import decode_example, load_examples, prompt_length, synthetic_size, synthetic_task
from octopus import BASELINE_SUFFIX, OCTOPUS_SUFFIX, SC, split_response
from reward import answer_of, format_reward, score_batch

# The released o1 prompt, verbatim: the question, then this (DripNowhy/Octopus,
# SFT/sft_in_dis_sampling.py, PROMPT_TEMPLATE; octopus.BASELINE_SUFFIX up to its newlines).
PLAIN_SUFFIX = (
    "\nYou first think through the reasoning process as an internal monologue, enclosed within"
    " <think> </think> tags. Then, provide your final answer enclosed within \\boxed{}.\n"
)
O1_SUFFIXES = {"plain": PLAIN_SUFFIX, "octopus": OCTOPUS_SUFFIX}

# The image sources the release keeps (SFT/sft_in_dis_sampling.py, `load_data`): short,
# checkable truths. The release tests `name in path`; here the first path component of the
# row's image must be one of them.
SOURCES = ("ai2d", "chartqa", "CLEVR_v1.0", "geoqa+", "gqa", "sqa", "textvqa", "ocr_vqa", "vg",
           "web", "wikiart")  # fmt: skip
ALL_CORRECT_SHARE = 0.4  # Sec. 4.1: 4k all-correct and 6k mixed inputs of 10k
CLASSES = ("all_correct", "mixed", "all_wrong")

STRONG_INSTRUCTION = (
    "\n\nBelow is a reference answer to this question. It may contain mistakes.\n"
    "Reference answer:\n{o1}\n\n"
    "The correct final answer is {truth}.\n"
    "Write a new, complete answer from scratch that reasons to the correct final answer. If the "
    "reference answer has mistakes, correct them implicitly: never mention the reference answer, "
    "and never say that you were given the correct answer. First think through your reasoning "
    "process as an internal monologue, enclosed within <think> </think> tags. Then, provide your "
    "final answer enclosed within \\boxed{{}}. Do not be too brief: include every reasoning step."
)

# The release's judge prompt, verbatim (SFT/sft_data_judge.py, PROMPT_TEMPLATE); text only.
JUDGE_PROMPT = """You are provided with a question and two responses. You need to judge whether this two responses are consistent with each other.

Question: {question}
Response 1: {response1}
Response 2: {response2}

If the two responses are consistent with each other, output "Yes".
If the two responses are not consistent with each other, output "No".

Please make sure your output is only "Yes" or "No".
"""  # noqa: E501

# =============================================================================================
# Selection (Sec. 4.1): pure functions over plain data
# =============================================================================================


def input_class(correct: list[bool]) -> str:
    """The class, "all_correct", "mixed" or "all_wrong", of the grades of one input's o1 samples."""
    if not correct:
        raise ValueError("an input without o1 samples has no class")
    return "all_correct" if all(correct) else "all_wrong" if not any(correct) else "mixed"


def quotas(n: int, all_correct_share: float = ALL_CORRECT_SHARE) -> tuple[int, int]:
    """(all-correct, mixed) inputs to keep of `n`: 4,000 and 6,000 of 10,000."""
    n_all = round(n * all_correct_share)
    return n_all, n - n_all


def quotas_met(classes: list[str], n: int, all_correct_share: float = ALL_CORRECT_SHARE) -> bool:
    """Whether the inputs classified so far fill both quotas of `n`."""
    q_all, q_mixed = quotas(n, all_correct_share)
    return classes.count("all_correct") >= q_all and classes.count("mixed") >= q_mixed


def select_inputs(
    classes: list[str], n: int, all_correct_share: float = ALL_CORRECT_SHARE
) -> list[int]:
    """The positions (ascending) of the inputs to keep, given each input's class in sampling
    order: the first all-correct and the first mixed inputs up to `quotas(n)`; when one class
    has too few, every input of it and the other class's next ones up to `n` in all. Never an
    all-wrong input. Taking the first ones makes a longer list keep a superset of a shorter
    one's choice once both quotas are met, so the inputs can be sampled in rounds."""
    q_all, q_mixed = quotas(n, all_correct_share)
    by_class = {c: [i for i, k in enumerate(classes) if k == c] for c in ("all_correct", "mixed")}
    short = max(0, q_all - len(by_class["all_correct"])) + max(0, q_mixed - len(by_class["mixed"]))
    take_all = min(len(by_class["all_correct"]), q_all + short)
    take_mixed = min(len(by_class["mixed"]), q_mixed + short)
    return sorted(by_class["all_correct"][:take_all] + by_class["mixed"][:take_mixed])


def chosen_o1(correct: list[bool]) -> int:
    """The o1 of a kept input that its row uses: a mixed input's first wrong one (the row is a
    w->c example), an all-correct input's first (c->c). The samples are exchangeable, so the
    first of a kind is a random one."""
    kind = input_class(correct)
    if kind == "all_wrong":
        raise ValueError("an all-wrong input is never kept")
    return correct.index(kind == "all_correct")


def round_size(
    n: int, classes: list[str], left: int, *, minimum: int = 1,
    all_correct_share: float = ALL_CORRECT_SHARE, margin: float = 1.1,
) -> int:  # fmt: skip
    """How many more inputs to sample: `n` first (all-wrong inputs are never kept, so at least
    `n` are needed); then what the rates seen so far say fills the larger shortfall, times
    `margin`; everything left when a needed class has not been seen yet."""
    if not classes:
        return min(left, max(n, minimum))
    q_all, q_mixed = quotas(n, all_correct_share)
    needs = []
    for kind, quota in (("all_correct", q_all), ("mixed", q_mixed)):
        have = classes.count(kind)
        if have < quota:
            if have == 0:
                return left
            needs.append((quota - have) * len(classes) / have)
    if not needs:
        return 0
    return min(left, max(minimum, math.ceil(max(needs) * margin)))


# =============================================================================================
# Which truths can be checked
# =============================================================================================

_CHOICE_RE = re.compile(r"^\(?[A-J]\)?[.:]?$")
_NUMBER_RE = re.compile(r"^[-+]?[\d.,/%\s]+[a-z%°]*$", re.IGNORECASE)
MAX_RULE_WORDS = 3  # "red", "left side", "New York City": a rule can still compare them


def rule_gradable(truth: str) -> bool:
    """Whether reward.py's rules can grade an answer against `truth`: a choice letter, a number,
    yes / no, a formula in LaTeX, or at most `MAX_RULE_WORDS` words. A sentence (ShareGPT4V's
    captions, DocVQA's or PISC's free text) needs a judge. Linear in the truth's length."""
    t = truth.strip().rstrip(".").strip()
    if not t or len(t) > 200:
        return False
    if _CHOICE_RE.match(t) or _NUMBER_RE.match(t) or t.lower() in ("yes", "no"):
        return True
    if "\\" in t or "$" in t:
        return True
    return len(t.split()) <= MAX_RULE_WORDS


def source_of(image_path: str, base_dir: str) -> str:
    """The image source of a row: the first path component of its image below the data file's
    folder (LLaVA-CoT's `image` field: `chartqa/train/png/1.png` -> `chartqa`)."""
    rel = os.path.relpath(image_path, base_dir) if os.path.isabs(image_path) else image_path
    return rel.replace("\\", "/").lstrip("./").split("/")[0]


def judge_verdict(text: str) -> bool | None:
    """The judge's Yes / No; None when it says neither (its input is then ungradable). Stricter
    than the release, which reads any "no" inside the text (as in "not") as No."""
    words = re.findall(r"[A-Za-z]+", text[:200])
    first = words[0].lower() if words else ""
    return True if first == "yes" else False if first == "no" else None


# =============================================================================================
# Prompts and rows
# =============================================================================================


def bare_question(example: dict) -> list[dict]:
    """The example's user content without any instruction suffix (the data loaders append the
    Octopus one by default): o1, the strong model and the written row each add their own."""
    content = []
    for item in example["messages"][0]["content"]:
        if item["type"] == "text":
            text = item["text"]
            for suffix in (OCTOPUS_SUFFIX, BASELINE_SUFFIX, PLAIN_SUFFIX):
                text = text.replace(suffix, "")
            item = {"type": "text", "text": text}
        content.append(item)
    return content


def question_text(example: dict) -> str:
    """The question's text alone (its images left out): what the judge reads."""
    return "".join(i["text"] for i in bare_question(example) if i["type"] == "text").strip()


def _append_text(content: list[dict], text: str) -> list[dict]:
    """`content` with `text` after its last text item (a new item when it ends with an image)."""
    if content and content[-1]["type"] == "text":
        return [*content[:-1], {"type": "text", "text": content[-1]["text"] + text}]
    return [*content, {"type": "text", "text": text.strip()}]


def o1_messages(example: dict, suffix: str) -> list[dict]:
    """The policy's chat for o1: the question with `suffix` after its last text."""
    return [{"role": "user", "content": _append_text(bare_question(example), suffix)}]


def strong_messages(example: dict, o1: str) -> list[dict]:
    """The strong model's chat: the question (with its images, without an instruction suffix),
    the policy's o1 as a reference, the ground truth, and the paper's instructions."""
    instruction = STRONG_INSTRUCTION.format(o1=o1, truth=example["answer"])
    return [{"role": "user", "content": _append_text(bare_question(example), instruction)}]


def judge_messages(question: str, truth: str, answer: str) -> list[dict]:
    """The judge's chat (text only, as the release's): is `answer` consistent with `truth`?"""
    text = JUDGE_PROMPT.format(question=question, response1=truth, response2=answer)
    return [{"role": "user", "content": [{"type": "text", "text": text}]}]


def question_row(example: dict, images_dir: str, rel: str) -> dict:
    """A data.py row for `example`: the question text (suffix removed) and its images saved as
    PNG files under `images_dir`, referenced relative to the output file."""
    texts, paths = [], []
    for item in bare_question(example):
        if item["type"] == "image":
            name = f"{example['id']}_{len(paths)}.png".replace("/", "_")
            item["image"].save(os.path.join(images_dir, name))
            paths.append(os.path.join(rel, name))
            texts.append("<image>")
        else:
            texts.append(item["text"])
    return {
        "id": example["id"],
        "question": "".join(texts),
        "answer": example["answer"],
        "images": paths,
    }


# =============================================================================================
# Engines and grading
# =============================================================================================


class Engines:
    """At most one live engine: `get(role)` hands back the live one when the role names the same
    model and settings, else closes it (its memory back to the device: vLLM refuses to start
    when less than gpu_memory_utilization x the card is free) and starts the role's. A judge
    that is the policy (the release's choice) then costs no engine start."""

    def __init__(self, specs: dict[str, tuple[str, dict]]):
        self.specs, self.live, self.key, self.rejoins = specs, None, None, 0

    def get(self, role: str):
        from rollout import VLLMEngine

        model, kw = self.specs[role]
        key = (model, json.dumps(kw, sort_keys=True, default=str))
        if self.key != key:
            self.close()
            self.live, self.key = VLLMEngine(model, **kw), key
        return self.live

    def close(self, rejoin: bool = True) -> None:
        """Close the live engine; under torchrun the ranks then `rejoin` a default group (the
        next engine and the gathers need one), except after the last engine: a rank that
        leaves first would leave the others waiting in the rendezvous."""
        if self.live is not None:
            import torch.distributed as dist

            from fsdp import free_cache

            self.live.close()
            self.live = self.key = None
            free_cache()
            if rejoin and int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
                # vLLM's teardown destroyed the default group it shared; the next engine joins
                # an existing one (else it starts a group of its own TP size, 1) and the
                # gathers need one
                self.rejoins += 1
                rejoin_group(self.rejoins)


def rejoin_group(k: int) -> None:
    """The default gloo group of torchrun's ranks again, the `k`-th time: on torchrun's store
    under a fresh prefix, since the keys of the group destroyed are still there (joining under
    them waits for peers that left)."""
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # torchrun hosts it
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=rank == 0 and not agent)  # fmt: skip
    dist.init_process_group("gloo", store=dist.PrefixStore(f"coldstart-{k}", store),
                            rank=rank, world_size=world)  # fmt: skip


# grade(phase, texts, examples) -> one True / False / None (ungradable) per text; phase "o1"
# or "o2". The default grades by rule, and by the judge where the truth is free text.
Grade = Callable[[str, list[str], list[dict]], list]


def rule_and_judge(engines: Engines | None, processor, has_judge: bool) -> Grade:
    """The default `Grade`: a part without a box is wrong, and so is an o2 that is not
    well-formed (`<think>` / box, no SC of its own); a short truth (`rule_gradable`) is graded
    by reward.py; a free-text truth by the judge (`--judge`), or None without one."""

    def grade(phase: str, texts: list[str], examples: list[dict]) -> list:
        from rollout import Sampling, render_prompt

        answers = [answer_of(t) if phase == "o1" or well_formed(t) else None for t in texts]
        out: list = [False if a is None else None for a in answers]
        by_rule = [i for i, a in enumerate(answers) if a and rule_gradable(examples[i]["answer"])]
        scores = score_batch([texts[i] for i in by_rule],
                             [examples[i]["answer"] for i in by_rule], kind="baseline")  # fmt: skip
        for i, s in zip(by_rule, scores, strict=True):
            out[i] = s.acc_final == 1.0
        asked = [i for i, v in enumerate(out) if v is None]
        judge = engines.get("judge") if has_judge else None  # every rank, asked or not
        if asked and judge is not None:
            prompts = [render_prompt(processor, judge_messages(
                question_text(examples[i]), examples[i]["answer"], answers[i])) for i in asked]  # fmt: skip
            groups = judge.generate(prompts, 1, Sampling(temperature=0.0, max_tokens=20))
            for i, g in zip(asked, groups, strict=True):
                out[i] = judge_verdict(g[0].text)
        return out

    return grade


# =============================================================================================
# The two phases
# =============================================================================================


def well_formed(o2: str) -> bool:
    """An o2 the row can end with: the format reward's `<think>` / box, and no SC of its own."""
    return format_reward(o2) == 1.0 and SC not in o2


def _gather(obj, world: int) -> list:
    """Every rank's `obj`, in rank order (itself alone without torchrun)."""
    if world == 1:
        return [obj]
    import torch.distributed as dist

    out: list = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _decoded(examples: list[dict], cache: dict[int, dict], k: int) -> dict:
    """Example `k` with its images decoded, once per process (o1 and o2 of one input share it)."""
    if k not in cache:
        cache[k] = decode_example(examples[k])
    return cache[k]


def sample_o1(
    engines: Engines, processor, examples: list[dict], pool: list[int], *, n: int,
    samples: int, sampling, suffix: str, grade: Grade, rank: int, world: int, cache: dict,
    log: Callable[[str], None] = lambda s: None,
) -> tuple[list[dict], dict]:  # fmt: skip
    """Phase 1: o1 for the inputs of `pool` (example positions, in sampling order), round after
    round until `n` can be filled (`round_size`); in each round rank r samples every world-th
    input. Returns the kept records (`select_inputs`, `chosen_o1`) and the counts."""
    from rollout import render_prompt

    counts = {"inputs_sampled": 0, "o1_samples": 0, "o1_correct": 0, "rounds": 0,
              "dropped_ungradable_o1": 0, "dropped_bad_image": 0}  # fmt: skip
    per_rank = [0] * world
    records: list[dict] = []  # classified inputs, in sampling order
    pos = 0
    while pos < len(pool):
        size = round_size(n, [r["class"] for r in records], len(pool) - pos, minimum=world)
        if size == 0:
            break
        chunk, pos = pool[pos : pos + size], pos + size
        counts["rounds"] += 1
        mine, bad = [], []
        for k in chunk[rank::world]:
            try:
                _decoded(examples, cache, k)
                mine.append(k)
            except ValueError as e:  # data.DataError: the row, the field and why
                bad.append(str(e))
        prompts = [render_prompt(processor, o1_messages(cache[k], suffix)) for k in mine]
        policy = engines.get("policy")  # on every rank: engines start together under torchrun
        groups = policy.generate(prompts, samples, sampling) if mine else []
        o1s = [[split_response(g.text)[0] for g in group] for group in groups]
        flat = [o for group in o1s for o in group]
        grades = grade("o1", flat, [examples[k] for k in mine for _ in range(samples)])
        part = [{"index": k, "rank": rank, "o1": o1s[j],
                 "correct": grades[j * samples : (j + 1) * samples]}
                for j, k in enumerate(mine)]  # fmt: skip
        gathered = _gather((part, bad), world)
        by_index = {r["index"]: r for p, _ in gathered for r in p}
        for r, (p, b) in enumerate(gathered):
            per_rank[r] += len(p) + len(b)
            counts["dropped_bad_image"] += len(b)
            for line in b[:3]:
                log(f"left out, its image does not decode: {line}")
        for k in chunk:  # sampling order, whatever rank sampled it
            if k not in by_index:
                continue
            rec = by_index[k]
            counts["inputs_sampled"] += 1
            counts["o1_samples"] += len(rec["correct"])
            if any(c is None for c in rec["correct"]):
                counts["dropped_ungradable_o1"] += 1  # never scored by accident
                continue
            counts["o1_correct"] += sum(rec["correct"])
            rec["class"] = input_class(rec["correct"])
            records.append(rec)
        log(f"round {counts['rounds']}: {len(chunk)} inputs; so far "
            + ", ".join(f"{c} {sum(r['class'] == c for r in records)}" for c in CLASSES))  # fmt: skip
    classes = [r["class"] for r in records]
    kept = [records[i] for i in select_inputs(classes, n)]
    for rec in kept:
        rec["chosen"] = chosen_o1(rec["correct"])
        rec["id"] = examples[rec["index"]]["id"]
    counts["inputs"] = len(records)
    for c in CLASSES:
        counts[f"inputs_{c}"] = classes.count(c)
    counts["kept_all_correct"] = sum(r["class"] == "all_correct" for r in kept)
    counts["kept_mixed"] = sum(r["class"] == "mixed" for r in kept)
    counts["o1_inputs_per_rank"] = per_rank
    return kept, counts


def write_o2(
    engines: Engines, processor, examples: list[dict], kept: list[dict], *, sampling,
    grade: Grade, out: str, rank: int, world: int, cache: dict,
) -> dict:  # fmt: skip
    """Phase 2: this rank's share of the kept inputs (those it sampled o1 for), one o2 each from
    the strong model given the question, the truth and the chosen o1; well-formed and correct
    o2 become rows; rank 0 writes them all to `out`, in the kept order. Returns the counts."""
    from rollout import render_prompt

    mine = [r for r in kept if r["rank"] == rank]
    prompts = [render_prompt(processor, strong_messages(_decoded(examples, cache, r["index"]),
                                                        r["o1"][r["chosen"]])) for r in mine]  # fmt: skip
    strong = engines.get("strong") if kept else None  # every rank, even one with no share
    groups = strong.generate(prompts, 1, sampling) if mine else []
    o2s = [g[0].text.strip() for g in groups]
    formed = [well_formed(o2) for o2 in o2s]
    grades = grade("o2", o2s, [examples[r["index"]] for r in mine])
    images_dir = os.path.join(os.path.dirname(os.path.abspath(out)), "images")
    os.makedirs(images_dir, exist_ok=True)
    rows, c = {}, {"o2_generated": len(o2s), "o2_well_formed": sum(formed), "o2_ungradable": 0,
                   "o2_correct": 0, "written_w2c": 0, "written_c2c": 0}  # fmt: skip
    for r, o2, g in zip(mine, o2s, grades, strict=True):
        c["o2_ungradable"] += g is None  # dropped, never scored by accident
        if not g:
            continue
        c["o2_correct"] += 1
        row = question_row(cache[r["index"]], images_dir, "images")
        row["response"] = r["o1"][r["chosen"]] + SC + o2
        rows[r["index"]] = row
        c["written_w2c" if r["class"] == "mixed" else "written_c2c"] += 1
    counts = {k: 0 for k in c}
    every: dict = {}
    for part_rows, part_counts in _gather((rows, c), world):
        every.update(part_rows)
        for k, v in part_counts.items():
            counts[k] += v
    if rank == 0:
        with open(out, "w") as f:
            for r in kept:
                if r["index"] in every:
                    f.write(json.dumps(every[r["index"]]) + "\n")
    counts["written"] = counts["written_w2c"] + counts["written_c2c"]
    return counts


# =============================================================================================
# The command
# =============================================================================================


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--policy", required=True, help="the model being trained (samples o1)")
    ap.add_argument("--strong", default="", help="the stronger model (default: the policy)")
    ap.add_argument("--in_distribution", action="store_true", help="o2 from the policy too")
    ap.add_argument("--data", required=True, help="JSONL / parquet / HF folder, or synthetic:N")
    ap.add_argument("--out", required=True, help="the JSONL to write (images/ beside it)")
    ap.add_argument("--phase", choices=("all", "o1", "o2"), default="all",
                    help="o1: sample and select, write <out>.o1.jsonl; o2: the strong model "
                    "from it (its own launch, e.g. for --tensor_parallel 2)")  # fmt: skip
    ap.add_argument("--inputs", type=int, default=10_000,
                    help="inputs to keep, all-correct : mixed = 4 : 6 (Sec. 4.1)")  # fmt: skip
    ap.add_argument("--seed", type=int, default=0, help="the order inputs are sampled in")
    ap.add_argument("--sources", default=",".join(SOURCES),
                    help="image sources to keep (first path component of a row's image), "
                    "comma-separated, or 'all'")  # fmt: skip
    ap.add_argument("--judge", default="",
                    help="a model that grades free-text truths (the release: the policy); "
                    "without one those inputs are dropped and counted")  # fmt: skip
    ap.add_argument("--samples", type=int, default=4, help="o1 samples per input")
    ap.add_argument("--o1_prompt", choices=sorted(O1_SUFFIXES), default="plain",
                    help="instruction after the question for o1: the release's plain one, or "
                    "the Octopus one")  # fmt: skip
    ap.add_argument("--temperature", type=float, default=0.6, help="o1 sampling")
    ap.add_argument("--top_p", type=float, default=0.9, help="o1 sampling")
    ap.add_argument("--top_k", type=int, default=20, help="o1 sampling (0: off)")
    ap.add_argument("--max_tokens", type=int, default=2048, help="o1 sampling")
    ap.add_argument("--o2_temperature", type=float, default=0.7, help="o2 sampling")
    ap.add_argument("--o2_top_p", type=float, default=1.0, help="o2 sampling")
    ap.add_argument("--o2_max_tokens", type=int, default=4096, help="o2 sampling")
    ap.add_argument("--max_model_len", type=int, default=16384, help="the engines' context")
    ap.add_argument("--tensor_parallel", type=int, default=1,
                    help="GPUs per strong-model engine (2 for Qwen3-VL-30B-A3B on 80 GB)")  # fmt: skip
    ap.add_argument("--gpu_memory_utilization", type=float, default=0.9,
                    help="share of each GPU an engine may take (one engine at a time)")  # fmt: skip
    ap.add_argument("--min_pixels", type=int, default=MIN_PIXELS, help="smallest image area")
    ap.add_argument("--max_pixels", type=int, default=MAX_PIXELS, help="largest image area")
    ap.add_argument("--kv_cache_gb", type=float, default=1.0, help="CPU only: KV-cache size")
    return ap.parse_args(argv)


def samplings(args: argparse.Namespace, context: int, longest_prompt: int) -> tuple:
    """The o1 and o2 `Sampling`s of the flags, their lengths fitted to a `context`-token engine
    after the longest prompt (`rollout.fit_max_tokens`)."""
    from rollout import Sampling, fit_max_tokens

    o1 = Sampling(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                  max_tokens=fit_max_tokens(args.max_tokens, context, longest_prompt))  # fmt: skip
    o2 = Sampling(temperature=args.o2_temperature, top_p=args.o2_top_p,
                  max_tokens=fit_max_tokens(args.o2_max_tokens, context, longest_prompt))  # fmt: skip
    return o1, o2


def load_inputs(args: argparse.Namespace, log) -> tuple[list[dict], dict]:
    """The examples that can be graded, and the counts of what was left out and why: rows of
    other sources (`--sources`), rows that do not load, free-text truths without `--judge`."""
    pixels = dict(min_pixels=args.min_pixels, max_pixels=args.max_pixels)
    if (n := synthetic_size(args.data)) is not None:
        examples = synthetic_task(n, seed=777, suffix="")
        counts = {"rows": len(examples), "dropped_load": 0}
    else:
        examples, report = load_examples(args.data, suffix="", **pixels)
        log(report.summary())
        counts = {"rows": report.rows, "dropped_load": len(report.skipped)}
    sources = None if args.sources == "all" else set(args.sources.split(","))
    base = os.path.dirname(os.path.abspath(args.data))
    kept, other, free = [], 0, 0
    for e in examples:
        paths = [i["image"].data for i in e["messages"][0]["content"]
                 if i["type"] == "image" and isinstance(getattr(i["image"], "data", None), str)]  # fmt: skip
        if (
            sources is not None
            and not args.data.startswith("synthetic:")
            and (not paths or any(source_of(p, base) not in sources for p in paths))
        ):
            other += 1
        elif not args.judge and not rule_gradable(e["answer"]):
            free += 1
        else:
            kept.append(e)
    if other:
        log(f"{other} rows of other image sources left out (--sources; 'all' keeps every row)")
    if free:
        log(f"{free} rows with a free-text truth left out: no --judge to grade them")
    counts.update(dropped_source=other, dropped_ungradable_truth=free, pool=len(kept))
    return kept, counts


def main(argv: list[str] | None = None, grade: Grade | None = None) -> dict:
    """The command; `grade` replaces the rule-and-judge grading (tests choose each input's
    class with it). Returns the summary (every rank)."""
    if argv and argv[0] == "llava-cot":
        return llava_cot(argv[1:])
    args = parse_args(argv)  # first: `--help` loads nothing
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.tensor_parallel > 1 and world > 1 and args.phase != "o1":
        # rollout.check_tensor_parallel refuses TP groups under torchrun (its ranks sample
        # their own prompts); one process with vLLM's own workers does the TP instead
        raise SystemExit(f"--tensor_parallel {args.tensor_parallel} under torchrun: run the "
                         "strong model as its own launch, `python coldstart.py ... --phase o2 "
                         "--tensor_parallel N`, after `torchrun ... --phase o1`")  # fmt: skip

    import torch.distributed as dist
    from transformers import AutoProcessor

    from data import max_images_of
    from rollout import clamp_model_len

    # a group of our own only under torchrun, to gather; each rank has its own engine. In one
    # process with other engines (tests), the group vLLM made is theirs: never destroyed here
    own_group = world > 1 and not dist.is_initialized()
    if own_group:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0

    def log(line: str) -> None:
        if rank == 0:
            print(f"[coldstart] {line}", file=sys.stderr)

    examples, load_counts = load_inputs(args, log)
    processor = AutoProcessor.from_pretrained(args.policy)
    suffix = O1_SUFFIXES[args.o1_prompt]
    strong = args.policy if args.in_distribution or not args.strong else args.strong
    pixels = dict(min_pixels=args.min_pixels, max_pixels=args.max_pixels)
    # No sleep mode: these engines never sleep, and vLLM's sleep-mode allocator is one pool per
    # process (vllm/device_allocator/cumem.py, `CuMemAllocator.get_instance`) that a second
    # engine would share with whatever the first left in it
    kw = dict(max_model_len=args.max_model_len, kv_cache_gb=args.kv_cache_gb, seed=rank,
              max_images=max_images_of(examples), sleep_mode=False,
              gpu_memory_utilization=args.gpu_memory_utilization, tensor_parallel=1,
              **pixels)  # fmt: skip
    judge_kw = {**kw, "max_model_len": min(args.max_model_len, 4096)}  # the release's judge
    engines = Engines({"policy": (args.policy, kw), "judge": (args.judge, judge_kw),
                       "strong": (strong, {**kw, "tensor_parallel": args.tensor_parallel})})  # fmt: skip
    if args.judge == args.policy:
        engines.specs["judge"] = engines.specs["policy"]
    elif args.judge == strong and args.phase == "o2":
        engines.specs["judge"] = engines.specs["strong"]
    grade = grade or rule_and_judge(engines, processor, bool(args.judge))
    longest = max((prompt_length(processor, {"messages": o1_messages(e, suffix)})
                   for e in examples), default=0)  # fmt: skip
    context = clamp_model_len(args.policy, args.max_model_len)
    o1_sampling, o2_sampling = samplings(args, context, longest)
    for name, asked, got in (("max_tokens", args.max_tokens, o1_sampling.max_tokens),
                             ("o2_max_tokens", args.o2_max_tokens, o2_sampling.max_tokens)):  # fmt: skip
        if got < asked:
            log(f"{name} {asked} does not fit the {context}-token context after the "
                f"longest prompt ({longest} tokens): using {got}")  # fmt: skip
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    o1_file, cache = args.out + ".o1.jsonl", {}
    if args.phase in ("all", "o1"):
        pool = list(range(len(examples)))
        random.Random(args.seed).shuffle(pool)
        kept, o1_counts = sample_o1(engines, processor, examples, pool, n=args.inputs,
                                    samples=args.samples, sampling=o1_sampling, suffix=suffix,
                                    grade=grade, rank=rank, world=world, cache=cache, log=log)  # fmt: skip
        o1_counts.update(load_counts)
        if rank == 0:
            with open(o1_file, "w") as f:
                f.write(json.dumps({"counts": o1_counts}) + "\n")
                for r in kept:
                    f.write(json.dumps(r) + "\n")
    else:
        kept, o1_counts = read_o1(o1_file, examples, world)
    summary = {"requested": args.inputs, **o1_counts}
    if args.phase in ("all", "o2"):
        summary.update(write_o2(engines, processor, examples, kept, sampling=o2_sampling,
                                grade=grade, out=args.out, rank=rank, world=world, cache=cache))  # fmt: skip
    summary["dropped_ungradable"] = (summary["dropped_ungradable_truth"]
                                     + summary["dropped_ungradable_o1"])  # fmt: skip
    if rank == 0:
        name = args.out + (".o1.summary.json" if args.phase == "o1" else ".summary.json")
        with open(name, "w") as f:
            json.dump(summary, f, indent=1)
        print(json.dumps(summary, indent=1))
        if summary["kept_all_correct"] + summary["kept_mixed"] < args.inputs:
            log(f"only {summary['kept_all_correct']} all-correct and {summary['kept_mixed']} "
                f"mixed inputs in {summary['inputs_sampled']} sampled: fewer than --inputs "
                f"{args.inputs} (more rows, or a judge, would fill it)")  # fmt: skip
    engines.close(rejoin=False)
    if own_group and dist.is_initialized():
        dist.destroy_process_group()
    return summary


def read_o1(path: str, examples: list[dict], world: int) -> tuple[list[dict], dict]:
    """The kept records of `--phase o1` (each to the rank of its position) and its counts; an
    input whose id is not where the o1 phase found it means the data changed in between."""
    with open(path) as f:
        lines = [json.loads(line) for line in f if line.strip()]
    counts, kept = lines[0]["counts"], lines[1:]
    for j, r in enumerate(kept):
        k = r["index"]
        if k >= len(examples) or examples[k]["id"] != r["id"]:
            raise SystemExit(f"{path}: line {j + 2} is input {r['id']} at position {k}, which "
                             "the data no longer has there: run --phase o1 again")  # fmt: skip
        r["rank"] = j % world
    return kept, counts


# =============================================================================================
# LLaVA-CoT without 510 GB: the rows first, then only their images from the split zip
# =============================================================================================


class JoinedParts(io.RawIOBase):
    """The byte-split parts of one file (`image.zip.part-aa`, `-ab`, ...), read as that file
    without joining them on disk: zipfile then extracts single members from the parts."""

    def __init__(self, paths: list[str]):
        self.paths = paths
        self.sizes = [os.path.getsize(p) for p in paths]
        self.size, self.pos, self.files = sum(self.sizes), 0, [open(p, "rb") for p in paths]

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = [offset, self.pos + offset, self.size + offset][whence]
        return self.pos

    def readinto(self, buffer) -> int:
        start, done, view = 0, 0, memoryview(buffer)
        for f, size in zip(self.files, self.sizes, strict=True):
            if done < len(view) and start <= self.pos < start + size:
                f.seek(self.pos - start)
                got = f.readinto(view[done : done + min(len(view) - done, start + size - self.pos)])
                done, self.pos = done + got, self.pos + got
            start += size
        return done

    def close(self) -> None:
        for f in self.files:
            f.close()
        super().close()


def choose_rows(
    rows: list[dict], n: int, *, sources: set[str] | None, judge: bool, seed: int
) -> list[dict]:
    """`n` LLaVA-CoT rows in a seeded random order, of `sources` (first path component of the
    `image` field) and, without a judge, with a truth `rule_gradable` can check."""
    from data import conversation_fields

    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    out = []
    for i in order:
        r = rows[i]
        image = r.get("image")
        if not isinstance(image, str) or (sources and source_of(image, "") not in sources):
            continue
        _, truth = conversation_fields(r.get("conversations"))
        if truth is None or (not judge and not rule_gradable(truth)):
            continue
        out.append(r)
        if len(out) == n:
            break
    return out


def extract_images(parts: list[str], names: list[str], dest: str) -> list[str]:
    """Extract the zip members of `names` (a member equal to the name or ending in `/name`) from
    the split zip `parts` into `dest/name`; returns the names not found."""
    import shutil
    import zipfile

    wanted = set(names)
    with zipfile.ZipFile(JoinedParts(sorted(parts))) as z:
        for info in z.infolist():
            name = info.filename
            hit = name if name in wanted else next(
                (name.split("/", k)[-1] for k in range(1, name.count("/") + 1)
                 if name.split("/", k)[-1] in wanted), None)  # fmt: skip
            if hit is None or info.is_dir():
                continue
            target = os.path.join(dest, hit)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with z.open(info) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
            wanted.discard(hit)
    return sorted(wanted)


def missing_images(rows_file: str) -> list[str]:
    """`file:row: path` of every row whose image is not a file beside `rows_file`."""
    base, out = os.path.dirname(os.path.abspath(rows_file)), []
    with open(rows_file) as f:
        for i, line in enumerate(f, start=1):
            image = json.loads(line).get("image") if line.strip() else None
            if image is not None and not os.path.isfile(os.path.join(base, image)):
                out.append(f"{rows_file}:row {i}: {image}")
    return out


def llava_cot(argv: list[str]) -> dict:
    """`coldstart.py llava-cot`: choose the rows, extract only their images from the parts,
    check every chosen row's image exists; `--delete_parts` then frees the 171 GB."""
    ap = argparse.ArgumentParser(prog="coldstart.py llava-cot", description=llava_cot.__doc__)
    ap.add_argument("--dir", required=True, help="the hf download: train.jsonl, image.zip.part-*")
    ap.add_argument("--rows", type=int, default=30_000, help="rows to choose (the o1 pool)")
    ap.add_argument("--out", default="train-chosen.jsonl", help="the chosen rows, in --dir")
    ap.add_argument("--sources", default=",".join(SOURCES), help="as coldstart.py's")
    ap.add_argument("--judge", action="store_true", help="keep free-text truths (a judge grades)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check", action="store_true", help="only check the chosen rows' images")
    ap.add_argument("--delete_parts", action="store_true", help="delete the parts afterwards")
    args = ap.parse_args(argv)
    out = os.path.join(args.dir, args.out)
    result: dict = {}
    if not args.check:
        with open(os.path.join(args.dir, "train.jsonl")) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        sources = None if args.sources == "all" else set(args.sources.split(","))
        chosen = choose_rows(rows, args.rows, sources=sources, judge=args.judge, seed=args.seed)
        with open(out, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in chosen)
        parts = glob.glob(os.path.join(args.dir, "image.zip.part-*"))
        if not parts:
            raise SystemExit(f"no image.zip.part-* in {args.dir}")
        result = {"rows": len(rows), "chosen": len(chosen)}
        result["not_in_zip"] = len(extract_images(parts, [r["image"] for r in chosen], args.dir))
    missing = missing_images(out)
    result["missing"] = len(missing)
    print(json.dumps(result))
    if missing:
        raise SystemExit(f"{len(missing)} chosen rows have no image:\n" + "\n".join(missing[:20]))
    if args.delete_parts:
        for p in glob.glob(os.path.join(args.dir, "image.zip.part-*")):
            os.remove(p)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
