"""eval.py: measures checked on hand-made responses; VLMEvalKit TSV; every mode on vLLM."""

import base64
import io
import json
import math
import os
import subprocess
import sys

import pytest
from PIL import Image

import eval as ev
from data import dots_image
from octopus import SC
from rollout import Rollout

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    cmd = [sys.executable, os.path.join(ROOT, "eval.py"), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def box(x):
    return f"<think>t</think>\\boxed{{{x}}}"


def record(pid, *answers, truth="4", tokens=10, category=None):
    text = SC.join(box(a) for a in answers)
    r = {"id": pid, "rounds": ev.grade_rounds(text, truth), "tokens": tokens}
    if category:
        r["category"] = category
    return r


def test_summary_on_hand_made_records():
    records = [
        record("a", 4, tokens=10, category="x"),  # right, no correction
        record("a", 3, 4, tokens=20, category="x"),  # w->c
        record("b", 4, 5, tokens=30, category="y"),  # c->w
        record("b", 3, 5, tokens=40, category="y"),  # w->w
    ]
    s = ev.summarize(records)
    assert s["acc@1"] == 0.5  # a1, b1 right at o1
    assert s["acc@2"] == 0.5  # a1, a2 right at the end
    assert s["corrects_itself"] == 0.75
    assert s["w->c"] == 0.25 and s["c->w"] == 0.25
    assert s["w->c_of_corrections"] == pytest.approx(1 / 3)
    assert s["mean_tokens"] == 25
    # pass@k over 2 samples per prompt: a has 2/2 right, b 0/2
    assert s["pass@k"] == {"1": 0.5, "2": 0.5}
    assert s["per_category"] == {"x": 1.0, "y": 0.0}


def test_pass_at_k_closed_form():
    assert ev.pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert ev.pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)  # C(3,2)/C(4,2)
    assert ev.pass_at_k(10, 3, 4) == pytest.approx(1 - math.comb(7, 4) / math.comb(10, 4))
    assert ev.pass_at_k(5, 0, 3) == 0.0 and ev.pass_at_k(5, 3, 3) == 1.0
    # the estimator is the exact probability that k draws without replacement hit a correct one
    import itertools

    draws = list(itertools.combinations([1, 1, 0, 0, 0, 0], 3))
    assert ev.pass_at_k(6, 2, 3) == pytest.approx(sum(any(d) for d in draws) / len(draws))
    with pytest.raises(ValueError):
        ev.pass_at_k(2, 1, 4)


def test_rounds_summary():
    records = [record("a", 3, 4, 4), record("b", 3, 3, 4)]
    for r in records:
        r["round_tokens"] = [10, 5, 5]
    s = ev.summarize(records)
    assert [r["acc"] for r in s["rounds"]] == [0.0, 0.5, 1.0]
    assert [r["cumulative_tokens"] for r in s["rounds"]] == [10, 15, 20]


def test_vlmevalkit_tsv_fixture(tmp_path):
    from data import EncodedImage, decode_example

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(buf, format="PNG")
    b64 = base64.b64encode(buf.getvalue()).decode()
    path = tmp_path / "bench.tsv"
    path.write_text(
        "index\timage\tquestion\thint\tA\tB\tC\tD\tanswer\tcategory\n"
        f"7\t{b64}\tWhat colour?\tLook closely.\tred\tblue\tgreen\t\tA\tcolour\n"
        f"8\t{b64}\tHow many sides?\t\t\t\t\t\t4\tcount\n"
    )
    ex = ev.load_vlmevalkit_tsv(str(path))
    assert [e["id"] for e in ex] == ["7", "8"] and [e["answer"] for e in ex] == ["A", "4"]
    text = ex[0]["messages"][0]["content"][1]["text"]
    # VLMEvalKit's multiple-choice prompt (ImageMCQDataset.build_prompt)
    assert text.startswith(
        "Hint: Look closely.\nQuestion: What colour?\nOptions:\nA. red\nB. blue\nC. green\n"
    )
    assert "D." not in text and "Please select the correct answer from the options above." in text
    assert ex[1]["messages"][0]["content"][1]["text"].startswith(
        "How many sides?\n\nYou first think"
    )
    assert ex[0]["category"] == "colour"
    # images stay encoded until the prompts are rendered, at the size they will have then:
    # resized into the released inference's range, 256x28x28 pixels at least
    held = ex[0]["messages"][0]["content"][0]["image"]
    assert isinstance(held, EncodedImage) and held.data == buf.getvalue()
    image = decode_example(ex[0])["messages"][0]["content"][0]["image"]
    assert image.getpixel((0, 0)) == (255, 0, 0)
    assert image.size == held.size == (448, 448) and 256 * 28 * 28 <= 448 * 448 <= 1280 * 28 * 28
    small = ev.load_vlmevalkit_tsv(str(path), min_pixels=32 * 32, max_pixels=64 * 64)
    assert decode_example(small[0])["messages"][0]["content"][0]["image"].size == (64, 64)


def test_mmmu_images_at_their_markers(tmp_path):
    """MMMU_DEV_VAL places each image at its `<image N>` marker (VLMEvalKit's split_MMMU); other
    benchmarks put the images first."""
    assert ev.interleave_images("x <image 2> y <image 1>", ["i1", "i2"]) == [
        {"type": "text", "text": "x "}, {"type": "image", "image": "i2"},
        {"type": "text", "text": " y "}, {"type": "image", "image": "i1"},
    ]  # fmt: skip
    with pytest.raises(ValueError, match="1 image"):
        ev.interleave_images("<image 2>", ["i1"])
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(buf, format="PNG")
    two = str([base64.b64encode(buf.getvalue()).decode()] * 2)
    line = f"1\t{two}\tCompare <image 1> with <image 2>.\t3\t4\tA\tvalidation\n"
    for name in ("MMMU_DEV_VAL", "MMStar"):
        path = tmp_path / f"{name}.tsv"
        path.write_text("index\timage\tquestion\tA\tB\tanswer\tsplit\n" + line)
        content = ev.load_eval_data(str(path))[0]["messages"][0]["content"]
        kinds = [c["type"] for c in content]
        if name == "MMMU_DEV_VAL":
            assert kinds == ["text", "image", "text", "image", "text"]
            assert content[0]["text"] == "Question: Compare "
        else:
            assert kinds == ["image", "image", "text"] and "<image 1>" in content[2]["text"]


def test_prompt_and_instruct_flags(tmp_path):
    """--prompt picks the suffix (the baselines' EasyR1 prompt, or none); --instruct is Table
    2's instruct-model row: no suffix, 4096 new tokens, the full output as the prediction."""
    from octopus import BASELINE_SUFFIX, OCTOPUS_SUFFIX

    path = tmp_path / "MathVista_MINI.tsv"
    path.write_text("index\tquestion\tanswer\n1\tHow many?\t4\n")
    texts = {}
    for flags in ([], ["--prompt", "baseline"], ["--instruct"]):
        args = ev.parse_args(["--model", "m", "--data", str(path), *flags])
        examples = ev.load_eval_data(str(path), suffix=ev.SUFFIXES[args.prompt])
        texts[args.prompt] = (examples[0]["messages"][0]["content"][-1]["text"], args.max_tokens)
    assert texts == {"octopus": ("How many?" + OCTOPUS_SUFFIX, 16384),
                     "baseline": ("How many?" + BASELINE_SUFFIX, 16384),
                     "none": ("How many?", 4096)}  # fmt: skip
    record = {"id": "1", "sample": 0, "response": box(3) + SC + box(4)}
    example = {"id": "1", "answer": "4", "row": {"index": "1", "answer": "4"}}
    octo, inst = (ev.prediction_rows([example], [record], 0, instruct) for instruct in (0, 1))
    assert (octo[0]["prediction_o1"], octo[0]["prediction"]) == ("3", "4")
    assert inst[0]["prediction"] == record["response"]


@pytest.mark.slow
def test_every_mode_runs_on_vllm(engine, processor, monkeypatch):
    from rollout import Sampling

    examples = ev.load_eval_data("synthetic:3")
    sampling = Sampling(temperature=0.6, top_p=0.95, max_tokens=12)
    for direct, rounds in ((False, 0), (True, 0), (False, 2)):
        recs = ev.run(
            engine, processor, examples, n=2, sampling=sampling, direct=direct, sc_rounds=rounds
        )
        assert len(recs) == 6 and all(len(r["rounds"]) >= 1 + rounds for r in recs)
        # each round samples at most max_tokens, and the record is graded from its own text
        assert all(1 <= r["tokens"] <= 12 * (1 + rounds) for r in recs)
        assert all(r["rounds"] == ev.grade_rounds(r["response"], r["truth"]) for r in recs)
        s = ev.summarize(recs)
        assert s["samples"] == 6 and set(s["pass@k"]) == {"1", "2"}
        if direct:
            assert all("<self-correction>" not in r["response"] for r in recs)
    # forced rounds append exactly SC after the previous answer and continue from there
    calls = []
    real = engine.generate

    def spy(prompts, n, sampling, prefixes=None):
        out = real(prompts, n, sampling, prefixes=prefixes)
        calls.append((prefixes, out))
        return out

    monkeypatch.setattr(engine, "generate", spy)
    # every sample's forced round in one generate call: 1 + 2 calls for 3 prompts x 2 samples
    recs = ev.run(engine, processor, examples, n=2, sampling=sampling, direct=False, sc_rounds=2)
    assert len(calls) == 3 and [len(c[0]) for c in calls[1:]] == [6, 6] and len(recs) == 6
    calls.clear()
    rec = ev.run(
        engine, processor, examples[:1], n=1, sampling=sampling, direct=False, sc_rounds=2
    )[0]
    first = calls[0][1][0][0].text
    assert calls[1][0] == [first.rstrip() + SC]
    second = calls[1][1][0][0].text
    assert calls[2][0] == [(first.rstrip() + SC + second).rstrip() + SC]
    assert rec["response"] == (first.rstrip() + SC + second).rstrip() + SC + calls[2][1][0][0].text
    assert rec["round_tokens"] == [len(c[1][0][0].ids) for c in calls]


def test_forced_rounds_stop_when_the_context_is_full(processor):
    """A sample whose prompt, answers and SC fill the context is not continued (vLLM would
    refuse the longer prompt): its remaining rounds spend 0 tokens and keep its last answer."""
    from data import prompt_length

    examples = ev.load_eval_data("synthetic:1")
    prompt_len = prompt_length(processor, examples[0])
    sc_len = len(processor.tokenizer(SC, add_special_tokens=False)["input_ids"])

    class Fixed:
        """Every call samples 100 tokens that end with a boxed 3."""

        def __init__(self, max_model_len):
            self.max_model_len, self.calls = max_model_len, 0

        def generate(self, prompts, n, sampling, prefixes=None):
            self.calls += 1
            return [[Rollout([7] * 100, [-1.0] * 100, "<think>t</think>\\boxed{3}", "stop")]]

    roomy = Fixed(100_000)
    rec = ev.run(roomy, processor, examples, n=1, sampling=None, direct=False, sc_rounds=2)[0]
    assert roomy.calls == 3 and rec["round_tokens"] == [100, 100, 100]
    # room for the first forced round only
    tight = Fixed(prompt_len + 2 * 100 + sc_len + ev.CONTEXT_MARGIN + 1)
    rec = ev.run(tight, processor, examples, n=1, sampling=None, direct=False, sc_rounds=2)[0]
    assert tight.calls == 2 and rec["round_tokens"] == [100, 100, 0]
    assert len(rec["rounds"]) == 2 and rec["tokens"] == 200


def test_direct_stops_sampling_at_the_correction_tag(processor):
    """--direct asks the engine to stop at `<self-correction>`: nothing after o1 is sampled or
    counted (cutting the text afterwards alone would still spend, and count, the o2 tokens)."""
    tok = processor.tokenizer
    full = box(2) + SC + box(3)

    class Honours:
        """Samples `full` and applies stop strings as vLLM does: the text ends before the
        first stop string, and only the tokens up to it are sampled."""

        max_model_len = 4096

        def generate(self, prompts, n, sampling, prefixes=None):
            cut = min([full.index(s) for s in sampling.stop if s in full], default=len(full))
            ids = tok.encode(full[:cut], add_special_tokens=False)
            return [[Rollout(ids, [-1.0] * len(ids), full[:cut], "stop")] * n for _ in prompts]

    from rollout import Sampling

    examples = [{**ev.load_eval_data("synthetic:1")[0], "answer": "3"}]
    for direct in (True, False):
        rec = ev.run(Honours(), processor, examples, n=1, sampling=Sampling(), direct=direct,
                     sc_rounds=0)[0]  # fmt: skip
        if direct:  # o1 alone, wrong, and only its tokens spent
            assert rec["response"] == box(2) and [r["correct"] for r in rec["rounds"]] == [False]
            assert rec["tokens"] == len(tok.encode(full.split("<self-correction>")[0]))
        else:  # the model corrects itself: 2 -> 3
            assert [r["correct"] for r in rec["rounds"]] == [False, True]
            assert rec["tokens"] == len(tok.encode(full)) > len(tok.encode(box(2))) + 5


@pytest.mark.slow  # a Python process
def test_help_exits_0_without_work(tmp_path):
    proc = cli("--help")
    assert (
        proc.returncode == 0 and "--sc_rounds" in proc.stdout and "--max_model_len" in proc.stdout
    )
    assert "--sc-rounds" not in proc.stdout and "--top_p" in proc.stdout
    assert "vLLM" not in proc.stderr  # no engine started


@pytest.mark.slow
def test_cli_defaults_are_clamped_and_rows_take_two_images(tiny_path, tmp_path):
    """The defaults (a 32768-token context, 16384 new tokens, the paper's pixel range) do not
    fit the tiny model: each is clamped with one line, and the run completes. The rows hold two
    images each: eval.py sizes the engine's image limit from the data (vLLM refuses a second
    image by default: "At most 1 image(s) may be provided in one prompt")."""
    import random

    rng = random.Random(0)
    lines = []
    for i in range(3):
        dots_image(i + 1, rng).save(tmp_path / f"a{i}.png")
        dots_image(i + 2, rng).save(tmp_path / f"b{i}.png")
        lines.append({"id": f"r{i}", "question": "<image><image>How many dots in both images?",
                      "answer": str(2 * i + 3), "images": [f"a{i}.png", f"b{i}.png"]})  # fmt: skip
    data = tmp_path / "two.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in lines))
    out = tmp_path / "eval"
    proc = cli("--model", tiny_path, "--data", str(data), "--out", str(out), "--n", "2")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "[engine] max_model_len 32768 > 4096" in proc.stderr
    assert "[eval] max_tokens 16384 does not fit" in proc.stderr
    assert json.load(open(out / "summary.json"))["samples"] == 6
    rows = [json.loads(line) for line in open(out / "samples.jsonl")]
    assert sorted({r["id"] for r in rows}) == ["r0", "r1", "r2"] and len(rows) == 6
    assert max(r["tokens"] for r in rows) <= 4096


def _table2_bench(folder) -> None:
    """The seven TSVs of Table 2, three rows each, with the columns VLMEvalKit's scoring reads
    (MathVista's question_type / answer_type, WeMath's key / ID, HallusionBench's index fields
    and l2-category, MMMU's dev / validation split and <image N> markers, CharXiv's
    grading_query), MCQ options, an image named by another row's index, several images."""
    rng = __import__("random").Random(0)

    def b64(count):
        buf = io.BytesIO()
        dots_image(count, rng).save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode()

    q = "How many dots are in the image?"
    vista = ["index\timage\tquestion\tanswer\tquestion_type\tanswer_type\tchoices\tanswer_option"]
    vista += [f"{i}\t{b64(i + 1)}\t{q}\t{i + 1}\tfree_form\tinteger\t\t" for i in range(3)]
    verse = ["index\timage\tquestion\tanswer\tmetadata"] + [
        f"{i}\t{b64(i + 1)}\t{q}\t{i + 1}\t{{'problem_version': 'Vision Only'}}" for i in range(3)
    ]
    mcq = ["index\timage\tquestion\tA\tB\tanswer\tcategory"] + [
        f"{i}\t{b64(i + 1) if i == 0 else '0'}\t{q}\t1\t2\tA\tcount" for i in range(3)
    ]
    wemath = ["index\timage\tquestion\tA\tB\tanswer\tkey\tID"] + [
        f"{i}\t{b64(1)}\t{q}\t1\t2\tA\t{key}\t1"
        for i, key in enumerate(["2steps_1", "2steps_2", "2steps_multi"])
    ]
    two = str([b64(1), b64(2)])
    mmmu = ["index\timage\tquestion\tA\tB\tanswer\tsplit"] + [
        f"{i}\t{two}\tDots in <image 1> and <image 2>?\t3\t4\tA\t{s}"
        for i, s in enumerate(["dev", "validation", "validation"])
    ]
    yorn = ["index\timage\tquestion\tanswer\tcategory\tl2-category"] + [
        f"VD_count_0_0_0_{i}\t{b64(2)}\tAre there 2 dots?\tYes\tVD\tcount" for i in range(3)
    ]
    charxiv = ["index\timage\tquestion\tanswer\tgrading_query\tinst_category"] + [
        f"{i}\t{b64(i + 1)}\t{q}\t{i + 1}\tGrade {{PREDICTION}}\t3" for i in range(3)
    ]
    files = {"MathVista_MINI": vista, "MathVerse_MINI": verse, "WeMath": wemath, "MMStar": mcq,
             "HallusionBench": yorn, "MMMU_DEV_VAL": mmmu, "CharXiv_reasoning_val": charxiv}  # fmt: skip
    for _, dataset, _ in ev.TABLE2:
        (folder / f"{dataset}.tsv").write_text("\n".join(files[dataset]) + "\n")


@pytest.mark.slow
def test_table2_in_one_command(tiny_path, tmp_path):
    """`eval.py --table2` on the tiny model: every benchmark evaluated with one engine, a
    VLMEvalKit predictions file per benchmark, scored as VLMEvalKit scores it, Table 2's layout
    printed (each column names its metric and whether a judge was needed), MMMU's validation
    rows only."""
    bench = tmp_path / "benchmarks"
    bench.mkdir()
    missing = cli("--table2", "--model", tiny_path, "--bench_dir", str(bench))
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert "MathVista_MINI.tsv" in missing.stderr and "Getting the data" in missing.stderr
    _table2_bench(bench)
    out = tmp_path / "t2"
    proc = cli("--table2", "--model", tiny_path, "--bench_dir", str(bench), "--out", str(out),
               "--limit", "2", "--max_tokens", "16", "--max_model_len", "1024")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    names = [name for name, _, _ in ev.TABLE2]
    table = json.load(open(out / "table2.json"))
    assert list(table) == names and all(t["samples"] == 2 for t in table.values())
    lines = [line for line in proc.stdout.splitlines() if line.startswith("|")]
    header = lines[0].strip("|").split("|")[1:-1]
    for cell, name in zip(header, names, strict=True):
        t = table[name]
        assert cell.strip().startswith(f"{name} {t['metric']} (")
        assert ("no judge needed" in cell) == (t["needs_judge"] == 0)
    assert table["WeMath"]["metric"] == "Score (Loose)"
    assert table["CharXiv-RQ"]["needs_judge"] == 2 and "gpt-4o-mini" in header[-1]
    for row, key in ((lines[2], "score@1"), (lines[3], "score@2")):
        cells = [float(c) for c in row.strip("|").split("|")[1:]]
        values = [table[n][key] for n in names]
        assert cells[:-1] == [round(v, 1) for v in values]
        assert cells[-1] == round(sum(values) / len(values), 1)
    # seven VLMEvalKit prediction files: the TSV's columns (no image), the answers, the text
    for name, dataset, _ in ev.TABLE2:
        path = out / name / f"{dataset}.tsv"
        assert table[name]["prediction_files"] == [str(path)]
        rows = ev.read_predictions(str(path))
        assert len(rows) == 2 and "image" not in rows[0]
        assert {"index", "question", "answer", "prediction", "prediction_o1", "response"} <= set(
            rows[0]
        )
        assert all(r["prediction"] == ev.vlmevalkit_prediction(r["response"]) for r in rows)
        summary = json.load(open(out / name / "score" / "summary.json"))
        assert summary["score"] == table[name]["score@2"]
    mmmu = ev.read_predictions(str(out / "MMMU-val" / "MMMU_DEV_VAL.tsv"))
    assert sorted(r["index"] for r in mmmu) == ["1", "2"]  # the dev row is not evaluated
