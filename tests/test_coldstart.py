"""coldstart.py: the selection of Sec. 4.1 (hand-worked cases and properties), which truths
can be checked, LLaVA-CoT's images from the split zip, and the tiny model end to end: every
count of the summary, one decode per image, two torchrun ranks writing one file."""

import io
import json
import os
import subprocess
import sys
import zipfile

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import coldstart
from coldstart import (
    chosen_o1,
    input_class,
    judge_verdict,
    quotas,
    quotas_met,
    round_size,
    rule_gradable,
    select_inputs,
    source_of,
)
from data import load_examples
from octopus import OCTOPUS_SUFFIX, SC, split_response
from rollout import Rollout

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AC, MX, AW = "all_correct", "mixed", "all_wrong"

# --------------------------------------------------------------------------- selection, by hand


def test_classes_quotas_and_the_o1_a_row_uses():
    assert [input_class(c) for c in ([True] * 4, [True, False, True, True], [False] * 4)] == [
        AC, MX, AW]  # fmt: skip
    assert quotas(10_000) == (4000, 6000) and quotas(5) == (2, 3) and quotas(1) == (0, 1)
    assert chosen_o1([True, False, True, False]) == 1  # mixed: its first wrong o1 (w->c)
    assert chosen_o1([False, False, True, False]) == 0
    assert chosen_o1([True] * 4) == 0  # all-correct: c->c
    with pytest.raises(ValueError, match="never kept"):
        chosen_o1([False] * 4)


def test_select_inputs_by_hand():
    order = [MX, AC, AW, MX, AC, AC, MX, MX]
    # quotas (2, 3): the first two all-correct (1, 4), the first three mixed (0, 3, 6)
    assert select_inputs(order, 5) == [0, 1, 3, 4, 6]
    assert quotas_met(order, 5) and not quotas_met(order[:6], 5)
    # one mixed only: it, and all-correct ones up to 5 in all; never the all-wrong input
    assert select_inputs([AC, AC, AW, AC, AC, AC, MX], 5) == [0, 1, 3, 4, 6]
    assert select_inputs([AW, AW], 5) == [] and select_inputs([], 3) == []


def test_round_size_by_hand():
    assert round_size(10, [], 100) == 10  # n at least: all-wrong inputs are never kept
    assert round_size(10, [], 4) == 4 and round_size(2, [], 100, minimum=8) == 8
    seen = [AC] * 4 + [MX] * 2 + [AW] * 4  # quotas (4, 6): 4 more mixed at 2 in 10 -> 20 x 1.1
    assert round_size(10, seen, 100) == 22 and round_size(10, seen, 15) == 15
    assert round_size(10, [AC] * 4 + [AW] * 6, 100) == 100  # no mixed seen yet: all that is left
    assert round_size(10, [AC] * 4 + [MX] * 6, 100) == 0


classes_st = st.lists(st.sampled_from([AC, MX, AW]), max_size=60)


@settings(max_examples=300, deadline=None)
@given(classes=classes_st, n=st.integers(0, 40), more=classes_st)
def test_selection_properties(classes, n, more):
    kept = select_inputs(classes, n)
    assert kept == sorted(set(kept))  # each input once
    assert all(classes[i] != AW for i in kept)
    have_ac, have_mx = classes.count(AC), classes.count(MX)
    assert len(kept) == min(n, have_ac + have_mx)
    q_ac, q_mx = quotas(n)
    n_ac = sum(classes[i] == AC for i in kept)
    if have_ac >= q_ac and have_mx >= q_mx:  # the data allows the proportion: exactly it
        assert (n_ac, len(kept) - n_ac) == (q_ac, q_mx)
        assert select_inputs(classes + more, n) == kept  # later rounds change nothing
    else:  # a short class is kept whole
        assert n_ac == min(have_ac, n) or len(kept) - n_ac == have_mx


# --------------------------------------------------------------------------- checkable truths


def test_rule_gradable_truths_and_judge_verdicts():
    short = ["B", "(C)", "42", "3.5 cm", "25%", "yes", "No", "\\frac{1}{2}", "red", "New York City"]
    assert all(rule_gradable(t) for t in short)
    free = ["The image shows a man riding a horse along a sandy beach at sunset.", "", "x" * 300]
    assert not any(rule_gradable(t) for t in free)
    assert [judge_verdict(t) for t in ("Yes", " no.", "Yes, they agree", "Maybe", "", "Not")] == [
        True, False, True, None, None, None]  # fmt: skip
    assert source_of("chartqa/train/png/1.png", "") == "chartqa"
    assert source_of("/d/llava/geoqa+/images/2.png", "/d/llava") == "geoqa+"


# --------------------------------------------------------------------------- LLaVA-CoT images


def _png(color: str, size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _llava_row(rid: str, image: str, question: str, conclusion: str) -> dict:
    gpt = f"<SUMMARY>s</SUMMARY><REASONING>r</REASONING><CONCLUSION>{conclusion}</CONCLUSION>"
    return {"id": rid, "image": image, "conversations": [
        {"from": "human", "value": question}, {"from": "gpt", "value": gpt}]}  # fmt: skip


def test_llava_cot_rows_first_then_only_their_images(tmp_path):
    """Chosen rows' images come out of the byte-split zip without joining it; the check names a
    row whose image is missing; --delete_parts removes the parts."""
    root = tmp_path / "llava-cot"
    root.mkdir()
    rows = [_llava_row(f"r{i}", f"{src}/img/{i}.png", "How many?", truth)
            for i, (src, truth) in enumerate([("chartqa", "3"), ("coco", "2"), ("sqa", "B"),
                                              ("sqa", "A long free-text caption of the image here."),
                                              ("ai2d", "7")])]  # fmt: skip
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:  # the archive holds every image under a top folder
        for i, r in enumerate(rows):
            z.writestr("images/" + r["image"], _png(["red", "blue", "green", "gray", "white"][i]))
    data = buf.getvalue()
    cut = [0, len(data) // 3, 2 * len(data) // 3, len(data)]
    for k in range(3):  # `split -b`: parts aa, ab, ac
        (root / f"image.zip.part-a{'abc'[k]}").write_bytes(data[cut[k] : cut[k + 1]])
    joined = coldstart.JoinedParts(sorted(str(p) for p in root.glob("image.zip.part-*")))
    assert joined.read() == data
    joined.seek(cut[1] - 2)
    assert joined.read(5) == data[cut[1] - 2 : cut[1] + 3]  # a read across two parts
    joined.close()

    result = coldstart.main(["llava-cot", "--dir", str(root), "--rows", "10"])
    chosen = [json.loads(line) for line in open(root / "train-chosen.jsonl")]
    # coco is not a kept source; the free-text truth needs --judge
    assert sorted(r["id"] for r in chosen) == ["r0", "r2", "r4"]
    assert result == {"rows": 5, "chosen": 3, "not_in_zip": 0, "missing": 0}
    assert Image.open(root / "sqa/img/2.png").getpixel((0, 0)) == (0, 128, 0)
    assert not (root / "coco").exists() and not (root / "sqa/img/3.png").exists()
    examples, report = load_examples(str(root / "train-chosen.jsonl"), suffix="")
    assert report.kept == 3 and not report.skipped

    coldstart.main(["llava-cot", "--dir", str(root), "--rows", "2", "--judge", "--seed", "1"])
    os.remove(root / json.loads(open(root / "train-chosen.jsonl").readline())["image"])
    with pytest.raises(SystemExit, match="1 chosen rows have no image"):
        coldstart.main(["llava-cot", "--dir", str(root), "--check"])
    coldstart.main(["llava-cot", "--dir", str(root), "--rows", "2", "--judge", "--seed", "1",
                    "--delete_parts"])  # fmt: skip
    assert not list(root.glob("image.zip.part-*"))


# --------------------------------------------------------------------------- the tiny model


class ByInput:
    """A `Grade` that sets each input's o1 grades by its id (`o1[id]`, one per sample, in
    sample order) and accepts an o2 unless its input is in `o2_wrong`; records what it saw."""

    def __init__(self, o1: dict, o2_wrong=(), samples=4):
        self.o1, self.o2_wrong, self.samples = o1, set(o2_wrong), samples
        self.seen: dict = {"o1": [], "o2": []}

    def __call__(self, phase, texts, examples):
        self.seen[phase] += [(e["id"], t) for e, t in zip(examples, texts, strict=True)]
        if phase == "o2":
            return [e["id"] not in self.o2_wrong for e in examples]
        return [self.o1[e["id"]][j % self.samples] for j, e in enumerate(examples)]


def _dataset(root) -> str:
    """A LLaVA-CoT-shaped JSONL: three all-correct, two mixed, one all-wrong and one ungradable
    input by `O1_GRADES`; a row of another source and one with a free-text truth."""
    rows = []
    for i, rid in enumerate([*O1_GRADES, "coco-1", "free-1"]):
        src = "coco" if rid == "coco-1" else ["sqa", "chartqa", "ai2d"][i % 3]
        (root / src).mkdir(parents=True, exist_ok=True)
        (root / src / f"{rid}.png").write_bytes(_png(["red", "blue"][i % 2], (48 + 8 * i, 40)))
        truth = "The picture shows two boats on a calm lake." if rid == "free-1" else str(i + 1)
        rows.append(_llava_row(rid, f"{src}/{rid}.png", "<image>\nHow many dots?", truth))
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(root / "train.jsonl")


T, F = True, False
O1_GRADES = {"ac-1": [T] * 4, "ac-2": [T] * 4, "ac-3": [T] * 4, "mx-1": [T, F, T, T],
             "mx-2": [F, F, T, F], "aw-1": [F] * 4, "ug-1": [T, None, T, T]}  # fmt: skip


@pytest.mark.slow
def test_summary_counts_every_input_and_images_decode_once(tiny_path, tmp_path, monkeypatch):
    """--inputs 5 asks for 2 all-correct and 3 mixed; only two inputs are mixed, so every input
    is sampled and the short class is filled with all-correct ones; the real tiny engine
    samples, the grades come from `ByInput`."""
    import data
    import rollout

    decodes: dict = {}
    real_decode = data.EncodedImage.decode

    def counting_decode(self):
        decodes[self.data] = decodes.get(self.data, 0) + 1
        return real_decode(self)

    sent: list = []  # (prompts, n) of every generate call, and the texts it gave
    real_generate = rollout.VLLMEngine.generate

    def recording_generate(self, prompts, n, sampling, **kw):
        groups = real_generate(self, prompts, n, sampling, **kw)
        sent.append((prompts, n, [[g.text for g in grp] for grp in groups]))
        return groups

    monkeypatch.setattr(data.EncodedImage, "decode", counting_decode)
    monkeypatch.setattr(rollout.VLLMEngine, "generate", recording_generate)
    grade = ByInput(O1_GRADES, o2_wrong={"ac-3"})
    out = tmp_path / "cs" / "coldstart.jsonl"
    summary = coldstart.main(["--policy", tiny_path, "--data", _dataset(tmp_path / "llava"),
                              "--out", str(out), "--inputs", "5", "--max_tokens", "8",
                              "--o2_max_tokens", "8", "--max_model_len", "1024",
                              "--kv_cache_gb", "0.1", "--min_pixels", "1024",
                              "--max_pixels", "4096"], grade=grade)  # fmt: skip
    expected = {"rows": 9, "dropped_load": 0, "dropped_source": 1, "dropped_ungradable_truth": 1,
                "pool": 7, "inputs_sampled": 7, "o1_samples": 28, "dropped_ungradable_o1": 1,
                "dropped_ungradable": 2, "inputs": 6, "inputs_all_correct": 3, "inputs_mixed": 2,
                "inputs_all_wrong": 1, "kept_all_correct": 3, "kept_mixed": 2,
                "o1_correct": 3 * 4 + 3 + 1, "o2_generated": 5, "o2_ungradable": 0,
                "o2_correct": 4, "written_w2c": 2, "written_c2c": 2, "written": 4,
                "o1_inputs_per_rank": [7], "requested": 5, "dropped_bad_image": 0}  # fmt: skip
    assert {k: summary[k] for k in expected} == expected
    assert json.loads(open(str(out) + ".summary.json").read()) == summary
    # rounds: 5 inputs first, then what the rates say, capped at the 2 left
    assert summary["rounds"] == 2 and [len(p) for p, n, _ in sent[:2]] == [5, 2]
    # each input's prompt sent once (its 4 samples in one request), each kept one once more to
    # the strong model, and each image decoded once (the rows of other sources never)
    assert all(n == 4 for _, n, _ in sent[:2]) and [(len(p), n) for p, n, _ in sent[2:]] == [(5, 1)]
    assert sorted(os.path.basename(p) for p in decodes) == sorted(f"{k}.png" for k in O1_GRADES)
    assert set(decodes.values()) == {1}
    # the rows: o1 is the sample chosen_o1 names (mixed: the first wrong one), then SC and o2
    by_id: dict = {}
    for rid, text in grade.seen["o1"]:
        by_id.setdefault(rid, []).append(text)
    rows, report = load_examples(str(out))
    assert report.kept == 4 and not report.skipped
    assert sorted(r["id"] for r in rows) == ["ac-1", "ac-2", "mx-1", "mx-2"]
    o2_of = dict(grade.seen["o2"])
    for r in rows:
        o1, o2 = split_response(r["response"])
        assert r["response"] == o1 + SC + o2 and o2 == o2_of[r["id"]]
        assert o1 == by_id[r["id"]][chosen_o1(O1_GRADES[r["id"]])]
        assert r["messages"][0]["content"][0]["type"] == "image"
    # the strong model saw the question, the truth and the chosen o1, no instruction suffix
    strong = sent[2][0][0]["prompt"]
    assert "How many dots?" in strong and "Reference answer:" in strong
    assert "never mention the reference answer" in strong and "<|image_pad|>" in strong
    assert "You first think through your reasoning process" not in strong


class RecordingEngine:
    """Stands in for VLLMEngine in coldstart.main where no flag needs a real one: records its
    arguments and what it is sent, and answers every prompt with a well-formed, boxed 1."""

    instances: list = []

    def __init__(self, model, **kwargs):
        self.model, self.kwargs, self.calls = model, kwargs, []
        self.max_model_len = min(kwargs["max_model_len"], 1000)
        RecordingEngine.instances.append(self)

    def generate(self, prompts, n, sampling, prefixes=None):
        self.calls.append((prompts, n, sampling))
        text = "<think>\nOne dot.\n</think>\n\n\\boxed{1}"
        return [[Rollout([1], [0.0], text, "stop") for _ in range(n)] for _ in prompts]

    def close(self):
        pass


def run_main(monkeypatch, tmp_path, tiny_path, *flags, grade=None):
    import rollout

    RecordingEngine.instances = []
    monkeypatch.setattr(rollout, "VLLMEngine", RecordingEngine)
    out = tmp_path / f"cs{len(list(tmp_path.iterdir()))}" / "rows.jsonl"
    summary = coldstart.main(["--policy", tiny_path, "--data", "synthetic:2", "--out", str(out),
                              "--max_model_len", "1000", *flags], grade=grade)  # fmt: skip
    return RecordingEngine.instances, summary


def test_o1_prompt_and_sampling_flags(monkeypatch, tmp_path, tiny_path, capsys):
    """The release's o1 sampling is the default (plain prompt, 0.6 / 0.9 / top-k 20, 2048
    tokens; o2 0.7 / 1.0, 4096 tokens); the flags change what the engine is sent."""
    mixed = ByInput({"dots-777-0": [T, F, T, T], "dots-777-1": [T, F, F, F]})
    (engine,), summary = run_main(monkeypatch, tmp_path, tiny_path, grade=mixed)
    (o1_prompts, n, o1), (o2_prompts, _, o2) = engine.calls
    assert n == 4 and summary["o1_samples"] == 8 and summary["written"] == 2
    assert all(p["prompt"].count(coldstart.PLAIN_SUFFIX) == 1 for p in o1_prompts)
    assert not any(OCTOPUS_SUFFIX.strip() in p["prompt"] for p in o1_prompts)
    assert (o1.temperature, o1.top_p, o1.top_k) == (0.6, 0.9, 20)
    assert (o2.temperature, o2.top_p, o2.top_k) == (0.7, 1.0, 0)
    # the context (1000 here) leaves less than 2048 / 4096 tokens: clamped, one line each
    err = capsys.readouterr().err
    assert "max_tokens 2048 does not fit" in err and "o2_max_tokens 4096 does not fit" in err
    assert o1.max_tokens == o2.max_tokens < 1000
    assert not any(coldstart.PLAIN_SUFFIX in p["prompt"] for p in o2_prompts)
    assert engine.kwargs["max_images"] == 1 and engine.kwargs["sleep_mode"] is False
    assert (engine.kwargs["min_pixels"], engine.kwargs["max_pixels"]) == (200704, 1003520)

    (engine,), _ = run_main(monkeypatch, tmp_path, tiny_path, "--o1_prompt", "octopus",
                            "--temperature", "1.0", "--top_k", "0", "--max_tokens", "64",
                            "--o2_temperature", "0.3", grade=mixed)  # fmt: skip
    (o1_prompts, _, o1), (_, _, o2) = engine.calls
    assert all(p["prompt"].count(OCTOPUS_SUFFIX.strip()) == 1 for p in o1_prompts)
    assert not any(coldstart.PLAIN_SUFFIX in p["prompt"] for p in o1_prompts)
    assert (o1.temperature, o1.top_k, o1.max_tokens, o2.temperature) == (1.0, 0, 64, 0.3)


def test_strong_model_flags_and_the_judge(monkeypatch, tmp_path, tiny_path):
    """--tensor_parallel and --gpu_memory_utilization reach the strong model's engine (the
    policy's keeps one GPU); a judge that is the policy reuses its engine, and grades a
    free-text truth that would otherwise be dropped."""
    engines, _ = run_main(monkeypatch, tmp_path, tiny_path, "--strong", "strong-model",
                          "--tensor_parallel", "2", "--gpu_memory_utilization", "0.8",
                          grade=ByInput({"dots-777-0": [T, F, T, T], "dots-777-1": [T] * 4}))  # fmt: skip
    policy, strong = engines
    assert (policy.model, strong.model) == (tiny_path, "strong-model")
    assert (policy.kwargs["tensor_parallel"], policy.kwargs["gpu_memory_utilization"]) == (1, 0.8)
    assert (strong.kwargs["tensor_parallel"], strong.kwargs["gpu_memory_utilization"]) == (2, 0.8)
    with pytest.raises(SystemExit, match="its own launch"):
        monkeypatch.setenv("WORLD_SIZE", "2")
        coldstart.main(["--policy", "p", "--data", "d", "--out", "o", "--tensor_parallel", "2"])
    monkeypatch.delenv("WORLD_SIZE")

    # a free-text truth: dropped without a judge, graded by it with one
    rows = tmp_path / "free.jsonl"
    (tmp_path / "sqa").mkdir()
    (tmp_path / "sqa" / "a.png").write_bytes(_png("red"))
    rows.write_text(json.dumps(_llava_row("f", "sqa/a.png", "What is it?", "A red square on a "
                                          "white background, drawn flat.")) + "\n")  # fmt: skip
    for judge, dropped, engine_count in (([], 1, 0), (["--judge", tiny_path], 0, 1)):
        RecordingEngine.instances = []
        summary = coldstart.main(["--policy", tiny_path, "--data", str(rows), "--out",
                                  str(tmp_path / f"j{dropped}" / "o.jsonl"), "--inputs", "1",
                                  "--max_model_len", "1000", *judge])  # fmt: skip
        assert summary["dropped_ungradable_truth"] == dropped
        assert len(RecordingEngine.instances) == engine_count
    # the judge (the policy's own engine) said neither Yes nor No to "1": ungradable, dropped
    (engine,) = RecordingEngine.instances
    judge_prompts = engine.calls[1][0]
    assert "Response 1: A red square" in judge_prompts[0]["prompt"] and engine.calls[1][1] == 1
    assert summary["dropped_ungradable_o1"] == summary["dropped_ungradable"] == 1
    assert summary["inputs"] == 0


@pytest.mark.slow
def test_two_ranks_sample_their_shares_and_write_one_file(tiny_path, tmp_path):
    """torchrun --nproc_per_node 2 (gloo): each rank samples half the inputs with its own
    policy engine, closes it and starts its strong one (the tiny model under another path);
    rank 0 writes one file with every kept input's row, in the kept order."""
    os.symlink(tiny_path, tmp_path / "strong")
    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "tests", "torchrun_coldstart.py"), tiny_path,
           str(tmp_path / "strong"), str(run)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((run / "cs.jsonl.summary.json").read_text())
    # synthetic:6, ids dots-777-0..5: by i % 3 all-correct, mixed, all-wrong; --inputs 4
    assert summary["o1_inputs_per_rank"] == [3, 3] and summary["inputs_sampled"] == 6
    assert (summary["inputs_all_correct"], summary["inputs_mixed"], summary["inputs_all_wrong"]) == (
        2, 2, 2)  # fmt: skip
    assert (summary["kept_all_correct"], summary["kept_mixed"], summary["written"]) == (2, 2, 4)
    rows = [json.loads(line) for line in open(run / "cs.jsonl")]
    kept = [json.loads(line) for line in open(run / "cs.jsonl.o1.jsonl")][1:]
    assert [r["id"] for r in rows] == [r["id"] for r in kept]
    assert sorted(r["rank"] for r in kept) == [0, 0, 1, 1]  # each rank's o2 for its own o1
    assert sorted(os.listdir(run / "images")) == sorted(f"{r['id']}_0.png" for r in rows)
    assert sorted(os.listdir(run)) == sorted(["cs.jsonl", "cs.jsonl.o1.jsonl",
                                              "cs.jsonl.summary.json", "images"])  # fmt: skip
    assert proc.stderr.count("round 1: 4 inputs") == 1  # rank 0 alone says it


@pytest.mark.slow
def test_help_exits_0_without_work(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "coldstart.py"), "--help"], env=env,
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0 and not list(tmp_path.iterdir())
    for flag in ("--in_distribution", "--o1_prompt", "--tensor_parallel",
                 "--gpu_memory_utilization", "--judge", "--inputs", "--phase"):  # fmt: skip
        assert flag in proc.stdout, flag
    assert "--in-distribution" not in proc.stdout
