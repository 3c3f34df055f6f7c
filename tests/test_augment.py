"""Correction splicing (arXiv 2602.08503, Sec. 3.2, Algorithm 1) and selective masks
(Sec. 4.3)."""

import random
import time
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import augment
from augment import (
    Sample,
    SplitRollout,
    candidate_pool,
    count_overlong,
    loss_masks,
    spliced_len,
    split_rollout,
    transition_counts,
)
from octopus import SC
from reward import score, score_batch

SC_IDS = [900, 901, 902]
EOS = 999


def splice_group(
    rollouts: list[SplitRollout], n_target: int, sc_ids: list[int], eos_id: int, **kw
) -> list[Sample]:
    """augment.splice_group with the parts' ids concatenated (`concat_ids=True`, the released
    code's splice, no tokenizer): the `fake` rollouts below are made-up ids with no text to
    encode, and `check_spliced` reads every splice back exactly."""
    return augment.splice_group(
        rollouts, n_target, sc_ids, eos_id, tokenizer=None, concat_ids=True, **kw
    )


def fake(i: int, o1: bool | None, o2: bool | None, *, has_sc: bool | None = None) -> SplitRollout:
    """SplitRollout i: o1 / o2 correctness (None: the part has no box); ids are distinct per rollout."""
    has_sc = (o2 is not None) if has_sc is None else has_sc
    a = [10 * i + 1, 10 * i + 2] if o1 is not None else None
    b = [10 * i + 5, 10 * i + 6, 10 * i + 7] if o2 is not None else None
    ids = (a or [10 * i]) + (SC_IDS + (b or [10 * i + 9]) if has_sc else []) + [EOS]
    final = bool(o2) if has_sc else bool(o1)
    o1_sc_len = len(a or [0]) + len(SC_IDS) if has_sc else None
    return SplitRollout(
        ids, a, b, bool(o1), bool(o2), final, o1_sc_len, len(a or [0]), 0.0, 1.0, 1.0
    )


def group_kinds(group: list[Sample]) -> Counter:
    return Counter(s.kind for s in group if s.kind != "original")


def check_spliced(group: list[Sample], rollouts: list[SplitRollout], *, allow_same: bool = False):
    """Sample by sample: originals first and unchanged; spliced ids, kind, o1_sc_len exact."""
    n = len(rollouts)
    for i, s in enumerate(group[:n]):
        assert s.kind == "original" and s.ids == rollouts[i].ids and s.source == (i, i)
        assert s.o1_sc_len == rollouts[i].o1_sc_len
    pairs = [s.source for s in group[n:] if s.kind != "original"]
    assert len(pairs) == len(set(pairs)), "a pair was used twice"
    for s in group[n:]:
        if s.kind == "original":
            continue
        i, j = s.source
        assert allow_same or i != j
        a, b = rollouts[i], rollouts[j]
        assert s.ids == a.o1 + SC_IDS + b.o2 + [EOS]
        assert s.o1_sc_len == len(a.o1) + len(SC_IDS) and s.o1_len == len(a.o1)
        assert (s.o1_correct, s.o2_correct) == (a.o1_correct, b.o2_correct)
        assert s.kind == ("c" if a.o1_correct else "w") + ("c" if b.o2_correct else "w")


def pattern(n: int, k: int) -> list[SplitRollout]:
    """o1 alternates wrong/correct; o2 is correct for the first k rollouts."""
    return [fake(i, o1=i % 2 == 1, o2=i < k) for i in range(n)]


# Worked by hand for pattern(4, k) and pattern(8, k): kinds of the N - n spliced samples.
# "neg" = any mix of cw and ww (drawn at random); k = 0 and k = n draw from the whole pool.
HAND_N4 = {
    0: {"neg": 4},
    1: {"wc": 1, "cc": 2, "neg": 1},  # quota 4-1 = 3: the one wc, then 2 cc
    2: {"wc": 2, "neg": 2},  # quota 2, 3 wc available: wc first, no cc
    3: {"wc": 1, "cw": 1, "ww": 2},  # quota 1; the 3 negatives are the whole neg pool
    4: {"pos": 4},
}
HAND_N8 = {
    0: {"neg": 8},
    1: {"wc": 3, "cc": 4, "neg": 1},  # wc pool is 3 (4 wrong o1 x 1 right o2, minus i = j)
    2: {"wc": 6, "neg": 2},
    3: {"wc": 5, "neg": 3},
    4: {"wc": 4, "neg": 4},
    5: {"wc": 3, "neg": 5},
    6: {"wc": 2, "neg": 6},
    7: {"wc": 1, "cw": 3, "ww": 4},  # the 7 negatives are the whole neg pool (3 cw + 4 ww)
    8: {"pos": 8},
}


@pytest.mark.parametrize("n, table", [(4, HAND_N4), (8, HAND_N8)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_paper_mode_hand_worked(n, table, seed):
    for k, expected in table.items():
        rollouts = pattern(n, k)
        assert sum(r.final_correct for r in rollouts) == k
        group = splice_group(rollouts, 2 * n, SC_IDS, EOS, mode="paper", rng=random.Random(seed))
        assert len(group) == 2 * n
        check_spliced(group, rollouts)
        kinds = group_kinds(group)
        got = dict(kinds)
        if "neg" in expected:
            got["neg"] = got.pop("cw", 0) + got.pop("ww", 0)
        if "pos" in expected:
            got["pos"] = got.pop("wc", 0) + got.pop("cc", 0)
        assert got == expected, (k, kinds)
        if 0 < k < n:  # balanced: half the group is positive
            positives = sum(
                s.o2_correct if s.o1_sc_len is not None else s.o1_correct for s in group
            )
            assert positives == n


def test_short_pools_paper_and_released():
    # only rollout 0 corrected itself (w->c); 1 is right without a correction, 2 and 3 wrong
    rollouts = [
        fake(0, False, True),
        fake(1, True, None),
        fake(2, False, None),
        fake(3, False, None),
    ]
    assert sum(r.final_correct for r in rollouts) == 2
    group = splice_group(rollouts, 8, SC_IDS, EOS, mode="paper", rng=random.Random(0))
    check_spliced(group, rollouts)
    # pool: (1,0) cc, (2,0) wc, (3,0) wc. Quota 2 -> both wc; no negatives exist -> the cc too.
    assert [s.source for s in group[4:]] in ([(2, 0), (3, 0), (1, 0)], [(3, 0), (2, 0), (1, 0)])
    assert len(group) == 7  # the paper mode never repeats originals to fill
    released = splice_group(rollouts, 8, SC_IDS, EOS, mode="released", rng=random.Random(0))
    check_spliced(released, rollouts, allow_same=True)
    # released pool adds (0,0) wc; quota (4-2)//2 = 1 wc, 1 cc, then the 2 leftover wc
    assert len(released) == 8 and Counter(s.kind for s in released[4:]) == {"wc": 3, "cc": 1}


def test_empty_pool_released_repeats_originals():
    rollouts = [fake(i, i % 2 == 0, None) for i in range(4)]
    assert len(splice_group(rollouts, 8, SC_IDS, EOS, rng=random.Random(0), mode="paper")) == 4
    released = splice_group(rollouts, 8, SC_IDS, EOS, rng=random.Random(0), mode="released")
    assert [s.source for s in released] == [(i, i) for i in range(4)] * 2
    assert all(s.kind == "original" for s in released)


def test_only_released_mode_pads_a_short_pool():
    # short pool: 3 candidates for 4 places. "paper" leaves a group of 7; "released" (whose pool
    # also has the i = j pairs) fills it and pads by repeating originals
    short = [fake(0, False, True), fake(1, True, None), fake(2, False, None), fake(3, False, None)]
    paper = splice_group(short, 8, SC_IDS, EOS, mode="paper", rng=random.Random(0))
    assert len(paper) == 7 and all(s.kind != "original" for s in paper[4:])
    empty = [fake(i, i % 2 == 0, None) for i in range(4)]  # no o2 anywhere: the pool is empty
    released = splice_group(empty, 8, SC_IDS, EOS, mode="released", rng=random.Random(0))
    assert [s.source for s in released] == [(i, i) for i in range(4)] * 2


def test_released_mode_quota_order():
    rollouts = pattern(4, 2)  # k = 2: quota (4-2)//2 = 1 wc, 1 cc, then one cw, then ww
    group = splice_group(rollouts, 8, SC_IDS, EOS, mode="released", rng=random.Random(3))
    check_spliced(group, rollouts, allow_same=True)
    assert [s.kind for s in group[4:]] == ["wc", "cc", "cw", "ww"]


def test_none_and_random_modes():
    rollouts = pattern(4, 2)
    assert len(splice_group(rollouts, 8, SC_IDS, EOS, rng=random.Random(0), mode="none")) == 4
    group = splice_group(rollouts, 8, SC_IDS, EOS, mode="random", rng=random.Random(0))
    check_spliced(group, rollouts)
    assert len(group) == 8
    with pytest.raises(ValueError, match="augment mode"):
        splice_group(rollouts, 8, SC_IDS, EOS, rng=random.Random(0), mode="bogus")


def test_spliced_reward_is_eq6_with_guards():
    r = [fake(0, False, False), fake(1, True, True)]
    r[0].o2_format = 0.0  # rollout 0's o2 is malformed
    group = splice_group(r, 4, SC_IDS, EOS, mode="paper", rng=random.Random(0))
    by_source = {s.source: s for s in group}
    assert by_source[(0, 1)].reward == pytest.approx(0.9 * 1.0 + 0.1)  # w->c
    assert by_source[(1, 0)].reward == pytest.approx(0.9 * -0.25 + 0.0)  # c->w, fmt(o2) = 0


# --------------------------------------------------------------------------- max_len


def long_pattern() -> list[SplitRollout]:
    """pattern(4, 2) (k = 2) where rollout 0's o2 has 10 tokens and rollout 1's o1 has 8.

    Spliced lengths (o1 + 3 SC + o2 + EOS): 2 + 3 + 3 + 1 = 9 for ordinary pairs, 16 for
    (i, 0), 15 for (1, j), 22 for (1, 0).
    """
    rollouts = pattern(4, 2)
    rollouts[0].o2 = list(range(500, 510))
    rollouts[1].o1 = list(range(600, 608))
    return rollouts


def test_spliced_len_hand_worked():
    r = long_pattern()
    assert spliced_len(r[2], r[3], len(SC_IDS)) == 9
    assert spliced_len(r[2], r[0], len(SC_IDS)) == 16
    assert spliced_len(r[1], r[2], len(SC_IDS)) == 15
    assert spliced_len(r[1], r[0], len(SC_IDS)) == 22


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_max_len_keeps_overlong_candidates_out_of_the_pool(seed):
    rollouts = long_pattern()
    rng = random.Random(seed)
    # Pool i != j: wc (0,1) (2,0) (2,1); cc (1,0) (3,0) (3,1); cw (1,2) (1,3) (3,2);
    # ww (0,2) (0,3) (2,3). max_len 9 drops every (i, 0) and every (1, j): 5 pairs, two wc
    # survive and the quota (16 // 2 - 2 = 2 positives) takes exactly those.
    assert count_overlong(rollouts, SC_IDS, 9) == 5
    group = splice_group(rollouts, 8, SC_IDS, EOS, mode="paper", rng=rng, max_len=9)
    check_spliced(group, rollouts)
    assert len(group) == 8
    spliced = group[4:]
    assert all(len(s.ids) <= 9 for s in spliced)
    assert sorted(s.source for s in spliced if s.o2_correct) == [(0, 1), (2, 1)]
    assert {s.source for s in spliced if not s.o2_correct} <= {(3, 2), (0, 2), (0, 3), (2, 3)}
    # the limit matters: without it the same selection takes overlong pairs (seed 0: (2, 0), 16
    # tokens; seeds 4, 5, 6 and 7 too)
    unlimited = [splice_group(long_pattern(), 8, SC_IDS, EOS, mode="paper", rng=random.Random(k))
                 for k in range(8)]  # fmt: skip
    assert sum(any(len(s.ids) > 9 for s in g[4:]) for g in unlimited) == 5


def test_max_len_boundary_and_empty_pool():
    rollouts = long_pattern()
    # 15 is the limit: (1, j) of length 15 stays; (i, 0) of 16 and (1, 0) of 22 go
    assert count_overlong(rollouts, SC_IDS, 15) == 3
    group = splice_group(rollouts, 16, SC_IDS, EOS, rng=random.Random(0), mode="random", max_len=15)
    assert {s.source for s in group[4:]} == {
        (0, 1), (2, 1), (3, 1), (1, 2), (1, 3), (3, 2), (0, 2), (0, 3), (2, 3)
    }  # fmt: skip
    # 8 is below every spliced length: nothing enters, the paper group keeps its originals
    assert count_overlong(rollouts, SC_IDS, 8) == 12
    assert len(splice_group(rollouts, 8, SC_IDS, EOS, rng=random.Random(0), max_len=8)) == 4
    padded = splice_group(rollouts, 8, SC_IDS, EOS, rng=random.Random(0), max_len=8,
                          mode="released")  # fmt: skip
    assert [s.source for s in padded] == [(i, i) for i in range(4)] * 2
    assert count_overlong(rollouts, SC_IDS, 8, mode="none") == 0


@pytest.mark.parametrize("seed", range(6))
def test_max_len_released_mode_counts_same_pairs(seed):
    rollouts = long_pattern()
    # released pool adds i = j: (0,0) (16 tokens) and (1,1) (15) are overlong at 9 as well
    assert count_overlong(rollouts, SC_IDS, 9, mode="released") == 7
    rng = random.Random(seed)
    group = splice_group(rollouts, 8, SC_IDS, EOS, mode="released", rng=rng, max_len=9)
    check_spliced(group, rollouts, allow_same=True)
    # the 9 short pairs: wc (0,1) (2,1); cc (3,1); cw (3,2) (3,3); ww (0,2) (0,3) (2,2) (2,3).
    # Quota (4 - 2) // 2 = 1: one wc, the one cc, one cw, then one ww.
    assert [s.kind for s in group[4:]] == ["wc", "cc", "cw", "ww"]
    assert group[4].source in ((0, 1), (2, 1)) and group[5].source == (3, 1)
    assert all(len(s.ids) <= 9 for s in group[4:])


@st.composite
def sized_groups(draw):
    """Rollouts with random part lengths, a random limit and target."""
    n = draw(st.integers(1, 6))
    rollouts = []
    for i in range(n):
        o1, o2 = draw(part), draw(part)
        r = fake(i, o1, o2)
        if r.o1 is not None:
            r.o1 = [10 * i + 1] * draw(st.integers(1, 6))
        if r.o2 is not None:
            r.o2 = [10 * i + 5] * draw(st.integers(1, 6))
        rollouts.append(r)
    return (
        rollouts,
        draw(st.integers(0, 20)),
        draw(st.sampled_from([n, 2 * n])),
        draw(st.integers()),
    )


@settings(max_examples=300, deadline=None)
@given(sized_groups(), st.sampled_from(["paper", "released", "random"]))
def test_max_len_invariants(g, mode):
    rollouts, max_len, n_target, seed = g
    n, same = len(rollouts), mode == "released"
    pairs = [(i, j) for i, a in enumerate(rollouts) for j, b in enumerate(rollouts)
             if a.o1 is not None and b.o2 is not None and (i != j or same)]  # fmt: skip
    lengths = {(i, j): len(rollouts[i].o1) + 3 + len(rollouts[j].o2) + 1 for i, j in pairs}
    fitting = [p for p in pairs if lengths[p] <= max_len]
    assert count_overlong(rollouts, SC_IDS, max_len, mode=mode) == len(pairs) - len(fitting)
    group = splice_group(
        rollouts, n_target, SC_IDS, EOS, mode=mode, rng=random.Random(seed), max_len=max_len
    )
    check_spliced(group, rollouts, allow_same=same)
    spliced = [s for s in group[n:] if s.kind != "original"]
    assert all(len(s.ids) <= max_len for s in spliced)
    assert len(spliced) == min(max(n_target - n, 0), len(fitting))


# --------------------------------------------------------------------------- masks


def test_loss_masks_stage1_and_stage2():
    s = Sample(ids=[1, 2, 3, 900, 901, 7, 8, EOS], kind="wc", o1_sc_len=5, o1_correct=False,
               o2_correct=True, source=(0, 1), o1_len=3)  # fmt: skip
    assert loss_masks(s, "1") == ([0, 0, 0, 0, 0, 1, 1, 1], [1, 1, 1, 0, 0, 0, 0, 0])
    assert loss_masks(s, "2") == ([0, 0, 0, 0, 0, 1, 1, 1], [0] * 8)
    cc = Sample(s.ids, "cc", 5, True, True, (0, 1), 3)
    assert loss_masks(cc, "1") == ([0, 0, 0, 0, 0, 1, 1, 1], [1, 1, 1, 0, 0, 0, 0, 0])
    assert loss_masks(cc, "2") == ([1] * 8, [0] * 8)
    plain = Sample([1, 2, EOS], "original", None, True, False, (0, 0), 2)
    assert loss_masks(plain, "1") == ([1, 1, 1], [0, 0, 0])
    assert loss_masks(plain, "2") == ([1, 1, 1], [0, 0, 0])
    with pytest.raises(ValueError, match="stage"):
        loss_masks(s, "3")


def test_transition_counts():
    rollouts = pattern(4, 2) + [fake(9, True, None)]
    assert transition_counts(rollouts) == {"wc": 1, "cc": 1, "cw": 1, "ww": 1, "none": 1}


# --------------------------------------------------------------------------- properties

part = st.sampled_from([None, False, True])


@st.composite
def groups(draw):
    n = draw(st.integers(1, 8))
    rollouts = []
    for i in range(n):
        o1, o2 = draw(part), draw(part)
        has_sc = draw(st.booleans()) if o2 is None else True
        rollouts.append(fake(i, o1, o2, has_sc=has_sc))
    return rollouts, draw(st.sampled_from([n, 2 * n, 2 * n + 3])), draw(st.integers(0, 10**6))


@settings(max_examples=300, deadline=None)
@given(groups(), st.sampled_from(["paper", "released", "random", "none"]))
def test_invariants_every_mode(g, mode):
    rollouts, n_target, seed = g
    n = len(rollouts)
    group = splice_group(rollouts, n_target, SC_IDS, EOS, mode=mode, rng=random.Random(seed))
    check_spliced(group, rollouts, allow_same=mode == "released")
    pool = [(i, j) for i, a in enumerate(rollouts) for j, b in enumerate(rollouts)
            if a.o1 is not None and b.o2 is not None and (i != j or mode == "released")]  # fmt: skip
    if mode == "none":
        assert len(group) == n
    elif mode == "released":
        assert len(group) == max(n_target, n)
    else:
        assert len(group) == n + min(max(n_target - n, 0), len(pool))
    if mode == "paper":
        k = sum(r.final_correct for r in rollouts)
        spliced = group[n:]
        pos_pool = [p for p in pool if rollouts[p[1]].o2_correct]
        quota = max(n_target // 2 - k, 0)
        need = max(n_target - n, 0)
        if 0 < k < n and len(pos_pool) >= quota and len(pool) - len(pos_pool) >= need - quota:
            assert sum(s.o2_correct for s in spliced) == min(quota, need)  # balanced
        if 0 < k < n and any(s.kind == "cc" for s in spliced):  # w->c always before c->c
            wc_pool = [p for p in pos_pool if not rollouts[p[0]].o1_correct]
            assert sum(s.kind == "wc" for s in spliced) == len(wc_pool)
    for s in group:
        for stage in ("1", "2"):
            policy, kl = loss_masks(s, stage)
            assert len(policy) == len(kl) == len(s.ids)
            if s.o1_sc_len is None:
                assert policy == [1] * len(s.ids) and kl == [0] * len(s.ids)
                continue
            assert s.o1_len <= s.o1_sc_len
            if stage == "1":
                assert policy == [0] * s.o1_sc_len + [1] * (len(s.ids) - s.o1_sc_len)
                assert kl == [1] * s.o1_len + [0] * (len(s.ids) - s.o1_len)
                assert not any(
                    p and q for p, q in zip(policy, kl, strict=True)
                )  # KL never on SC or o2
            else:
                assert kl == [0] * len(s.ids)
                assert (policy[0] == 0) == (s.o1_correct != s.o2_correct)


# --------------------------------------------------------------------------- real tokenizer


def graded_rollout(ids: list[int], tokenizer, truth: str) -> SplitRollout:
    """`split_rollout` of sampled `ids`, graded as the trainer grades them (the text without
    its trailing EOS / padding, against `truth`)."""
    special = set(tokenizer.all_special_ids)
    body = list(ids)
    while body and body[-1] in special:
        body.pop()
    return split_rollout(ids, tokenizer, score(tokenizer.decode(body), truth))


O1 = "<think>\nI count 3 dots.\n</think>\n\n\\boxed{3}"
O2 = "<think>\nLook again: 4 dots.\n</think>\n\n\\boxed{4}"


def test_split_rollout_with_real_tokenizer(tokenizer):
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    text = O1 + " is my answer." + SC + O2 + " Final."
    ids = tokenizer.encode(text, add_special_tokens=False) + [eos]
    r = graded_rollout(ids, tokenizer, "4")
    assert (r.o1_correct, r.o2_correct, r.final_correct) == (False, True, True)
    assert tokenizer.decode(ids[r.o1_sc_len :]).startswith(O2)
    # ".\n" is one token straddling o1 and SC: it is left out of the KL's o1 tokens
    assert tokenizer.decode(ids[: r.o1_len]) == O1 + " is my answer"
    assert tokenizer.convert_ids_to_tokens(ids[r.o1_len]).startswith(".Ċ")
    assert tokenizer.decode(r.o1) == O1 and tokenizer.decode(r.o2) == O2  # cut after the box


def test_boundary_token_straddles_brace_and_newlines(tokenizer):
    """'}\\n\\n' is one token in Qwen's tokenizers (and the tiny one): it holds the end of o1
    and the start of SC. It counts as o1 + SC for o1_sc_len, and is left out of o1_len."""
    text = O1 + SC + O2
    ids = tokenizer.encode(text, add_special_tokens=False)
    tokens = tokenizer.convert_ids_to_tokens(ids)
    straddle = tokens.index("}ĊĊ")
    r = graded_rollout(ids, tokenizer, "3")
    assert r.o1_len == straddle  # everything before the '}\n\n' token
    assert tokenizer.decode(ids[: r.o1_sc_len]).endswith("</self-correction>\n\n")
    assert tokenizer.decode(ids[r.o1_sc_len :]) == O2
    assert (r.o1_correct, r.o2_correct) == (True, False)


def test_spliced_decode_is_exact(tokenizer):
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    sc_ids = tokenizer.encode(SC, add_special_tokens=False)
    texts = [O1 + SC + O2, O2 + "\n\n< self-correction >\n</self-correction>\n\n" + O1]
    rollouts = [graded_rollout(tokenizer.encode(t, add_special_tokens=False) + [eos], tokenizer, "4")
                for t in texts]  # fmt: skip
    group = splice_group(rollouts, 4, sc_ids, eos, mode="paper", rng=random.Random(0))
    assert len(group) == 4
    by_source = {s.source: s for s in group}
    assert tokenizer.decode(by_source[(0, 1)].ids) == O1 + SC + O1 + "<|im_end|>"
    assert tokenizer.decode(by_source[(1, 0)].ids) == O2 + SC + O2 + "<|im_end|>"
    for s in group[2:]:
        assert tokenizer.decode(s.ids[: s.o1_sc_len]).endswith(SC)
        assert tokenizer.decode(s.ids[: s.o1_len]) in (O1, O2)
    # truth 4: (0,1) = o1 "3" + o2 "3" is w->w; (1,0) = o1 "4" + o2 "4" is c->c
    assert by_source[(0, 1)].kind == "ww" and by_source[(1, 0)].kind == "cc"


def test_canonical_splices_are_the_tokens_sampling_would_give(tokenizer):
    """Parts encoded apart leave '}' + '\\n' + '\\n' at the o1/SC boundary where the model
    samples the single token '}\\n\\n'; with the tokenizer, a splice is its whole text encoded
    once, exactly as an original rollout of that text, masks included."""
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    sc_ids = tokenizer.encode(SC, add_special_tokens=False)
    # the second rollout's o2 does not start with <think>: its splices take the whole-text path
    texts = [O1 + SC + O2, O2 + SC + "So, " + O1]
    rollouts = [graded_rollout(tokenizer.encode(t, add_special_tokens=False) + [eos], tokenizer, "4")
                for t in texts]  # fmt: skip
    parts = splice_group(rollouts, 4, sc_ids, eos, rng=random.Random(0))
    whole = augment.splice_group(
        rollouts, 4, sc_ids, eos, tokenizer=tokenizer, rng=random.Random(0)
    )
    assert {s.source for s in whole[2:]} == {(0, 1), (1, 0)}
    for a, b in zip(parts[2:], whole[2:], strict=True):
        assert tokenizer.decode(a.ids) == tokenizer.decode(b.ids)  # the same text
        assert a.ids != b.ids and "}ĊĊ" in tokenizer.convert_ids_to_tokens(b.ids)
        text = tokenizer.decode(b.ids[:-1])
        again = graded_rollout(
            tokenizer.encode(text, add_special_tokens=False) + [eos], tokenizer, "4"
        )
        assert b.ids == again.ids and (b.o1_sc_len, b.o1_len) == (again.o1_sc_len, again.o1_len)
        assert (b.kind, b.reward, b.source) == (a.kind, a.reward, a.source)


def test_an_o2_that_corrects_itself_again_is_graded_but_not_spliced(tokenizer):
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    text = O1 + SC + O2 + SC + O1  # three rounds: o2 is really o2 + SC + o3
    r = graded_rollout(tokenizer.encode(text, add_special_tokens=False) + [eos], tokenizer, "3")
    assert r.o1 is not None and r.o2 is None  # its o2 never enters a pool
    assert r.o1_sc_len is not None and r.final_correct  # graded as sampled: the last box is o3's
    two = graded_rollout(
        tokenizer.encode(O1 + SC + O2, add_special_tokens=False) + [eos], tokenizer, "3"
    )
    pool = candidate_pool([two, r])
    assert all(j == 0 for pairs in pool.values() for _, j in pairs)  # o2 only from rollout 0


def test_no_correction_and_missing_boxes(tokenizer):
    ids = tokenizer.encode(
        "<think>no box</think> nothing" + SC + "also nothing", add_special_tokens=False
    )
    r = graded_rollout(ids, tokenizer, "1")
    assert r.o1 is None and r.o2 is None and r.o1_sc_len is not None and not r.final_correct
    ids = tokenizer.encode(O1, add_special_tokens=False)
    r = graded_rollout(ids, tokenizer, "3")
    assert r.o1_sc_len is None and r.o2 is None and r.final_correct and r.o1_len == len(ids)


M = 1_000_000
O1_NL = "<think>x" + "\n" * (M // 2) + "x</think>\\boxed{1}"
O2_SP = "<think>" + " " * (M // 2) + "</think>\\boxed{2}"
# 1M-character degenerate responses through scoring and split_rollout with the tiny tokenizer,
# and what the rollout must hold: (o1 kept, o2 kept, has SC, o1 correct, o2 correct).
DEGENERATE = {
    "whitespace run": (" \t\r\n" * (M // 4), (False, False, False, False, False)),
    "newlines": ("\n" * M, (False, False, False, False, False)),
    "<think> repeated": ("<think>" * (M // 7), (False, False, False, False, False)),
    "'< / > ' repeated": ("< / > " * (M // 6), (False, False, False, False, False)),
    "\\boxed{ repeated": ("\\boxed{" * (M // 7), (False, False, False, False, False)),
    "{ run": ("{" * M, (False, False, False, False, False)),
    "<self-correction> repeated": ("<self-correction>" * (M // 17), (False,) * 5),
    "one letter": ("a" * M, (False, False, False, False, False)),
    "one letter, answered": ("<think>" + "a" * M + "</think>\\boxed{1}", (True, False, False, True, False)),
    "runs in o1 and o2": (O1_NL + SC + O2_SP, (True, True, True, True, False)),
    "SC repeated": (("x" + SC) * (M // 40), (False, False, True, False, False)),
    # U+FFFD spelled in valid UTF-8: the byte offsets stay exact (the fast path)
    "replacement characters": ("\ufffd" * (M // 2) + SC + "\ufffd" * (M // 2), (False, False, True, False, False)),
}  # fmt: skip


@pytest.mark.slow  # 1M-token responses: seconds each
@pytest.mark.parametrize("name", list(DEGENERATE))
def test_degenerate_million_char_responses_split_in_linear_time(tokenizer, name):
    text, (has_o1, has_o2, has_sc, o1_ok, o2_ok) = DEGENERATE[name]
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = tokenizer.encode(text, add_special_tokens=False) + [eos]
    t = time.monotonic()
    graded = score_batch([tokenizer.decode(ids, skip_special_tokens=True)], ["1"])[0]
    r = split_rollout(ids, tokenizer, graded)
    # linear: ~1 s (5-15 s on a loaded machine); a quadratic step: hours
    assert time.monotonic() - t < 120.0
    assert (r.o1 is not None, r.o2 is not None, r.o1_sc_len is not None) == (has_o1, has_o2, has_sc)
    assert (r.o1_correct, r.o2_correct) == (o1_ok, o2_ok)
    assert r.reward == graded.reward and r.ids == ids
    if has_sc:
        assert tokenizer.decode(ids[: r.o1_sc_len]).endswith("</self-correction>\n\n")
    if name == "runs in o1 and o2":  # the cut parts are the exact texts, encoded
        assert tokenizer.decode(r.o1) == O1_NL and tokenizer.decode(r.o2) == O2_SP


@pytest.mark.slow  # 1M tokens decoded ~40 times
def test_invalid_utf8_million_tokens_fall_back_exactly(tokenizer):
    """Sampled bytes that are not UTF-8 (a lone 0x80 per token, decoded as U+FFFD): per-token
    byte offsets are not exact, so o1_sc_len comes from O(log n) prefix decodes, still exact."""
    lone = tokenizer.convert_tokens_to_ids("Ģ")  # byte-level BPE's spelling of byte 0x80
    sc_ids = tokenizer.encode(SC, add_special_tokens=False)
    half = M // 2
    ids = [lone] * half + sc_ids + [lone] * half
    text = tokenizer.decode(ids)
    assert text == "\ufffd" * half + SC + "\ufffd" * half
    assert augment._byte_ends(tokenizer, ids, text) is None
    literal = tokenizer.encode("\ufffd" * 3 + SC, add_special_tokens=False)
    assert augment._byte_ends(tokenizer, literal, tokenizer.decode(literal)) is not None
    t = time.monotonic()
    r = graded_rollout(ids, tokenizer, "1")
    # ~2 * 20 prefix decodes of 1M tokens: ~4 s (~23 s on a loaded machine); one per token: hours
    assert time.monotonic() - t < 120.0
    assert (r.o1_sc_len, r.o1_len, r.o1, r.o2) == (half + len(sc_ids), half, None, None)


def test_byte_offsets_agree_with_prefix_decodes(tokenizer):
    """The fast path (byte lengths per token) against prefix decodes, at every character
    boundary, on non-ASCII text too: the first k tokens reaching `c` characters decode to
    text that starts with text[:c], and k - 1 tokens do not."""
    text = O1 + " ünïcødé 数 ✓" + SC + O2 + " 😀"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    ends = augment._byte_ends(tokenizer, ids, text)
    assert ends is not None

    def dec(k):
        return tokenizer.decode(ids[:k])

    for char in range(1, len(text) + 1):
        k = augment._first_token_reaching(tokenizer, ids, text, char, ends)
        assert dec(k).startswith(text[:char]) and not dec(k - 1).startswith(text[:char]), char
        m = augment._last_token_within(tokenizer, ids, text, char, ends)
        assert text[:char].startswith(dec(m)), char
        assert m == len(ids) or not text[:char].startswith(dec(m + 1)), char
        if text[char - 1 : char + 1].isascii():  # where prefix decodes are exact, both agree
            assert k == augment._first_token_reaching(tokenizer, ids, text, char, None)
            assert m == augment._last_token_within(tokenizer, ids, text, char, None)


def test_splice_group_needs_a_tokenizer_or_an_explicit_id_splice():
    rollouts = pattern(4, 2)
    with pytest.raises(ValueError, match="concat_ids=True"):
        augment.splice_group(rollouts, 8, SC_IDS, EOS, tokenizer=None, rng=random.Random(0))
    with pytest.raises(TypeError, match="rng"):  # no hidden Random(0): the caller seeds it
        augment.splice_group(rollouts, 8, SC_IDS, EOS, tokenizer=None, concat_ids=True)


class _ByteTokenizer:
    """The three calls `_token_bytes` makes, over a byte-level vocabulary."""

    def __init__(self, vocab: list[str]) -> None:
        self.vocab = vocab

    def __len__(self) -> int:
        return len(self.vocab)

    def get_added_vocab(self) -> dict[str, int]:
        return {}

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [self.vocab[i] for i in ids]


def test_token_bytes_cache_is_keyed_by_the_tokenizer_object():
    """The table is cached per tokenizer object and leaves with it: a tokenizer created later
    at the same address (the same `id`, which CPython reuses) builds its own."""
    import gc

    first = _ByteTokenizer(["a", "Ġ"])  # "Ġ" spells the byte 0x20 (a space)
    assert augment._token_bytes(first) == [b"a", b" "]
    assert augment._token_bytes(first) is augment._token_bytes(first)  # built once
    held = len(augment._TOKEN_BYTES)
    del first
    gc.collect()
    assert len(augment._TOKEN_BYTES) == held - 1
    assert augment._token_bytes(_ByteTokenizer(["b", "c"])) == [b"b", b"c"]
