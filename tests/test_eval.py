"""eval.py: measures checked on hand-made responses; VLMEvalKit TSV; every mode on vLLM."""

import base64
import io
import math

import pytest
from PIL import Image

import eval as ev
from octopus import SC


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
    assert text.startswith(
        "Hint: Look closely.\nWhat colour?\nOptions:\nA. red\nB. blue\nC. green\n"
    )
    assert "D." not in text and "Please select the correct answer from the options above." in text
    assert ex[1]["messages"][0]["content"][1]["text"].startswith(
        "How many sides?\n\nYou first think"
    )
    assert ex[0]["messages"][0]["content"][0]["image"].getpixel((0, 0)) == (255, 0, 0)
    assert ex[0]["category"] == "colour"


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
        s = ev.summarize(recs)
        assert 0 <= s["acc@2"] <= 1 and set(s["pass@k"]) == {"1", "2"}
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
    rec = ev.run(
        engine, processor, examples[:1], n=1, sampling=sampling, direct=False, sc_rounds=2
    )[0]
    first = calls[0][1][0][0].text
    assert calls[1][0] == [first.rstrip() + SC]
    second = calls[1][1][0][0].text
    assert calls[2][0] == [(first.rstrip() + SC + second).rstrip() + SC]
    assert rec["response"] == (first.rstrip() + SC + second).rstrip() + SC + calls[2][1][0][0].text
    assert rec["round_tokens"] == [len(c[1][0][0].ids) for c in calls]
