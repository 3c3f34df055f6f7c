"""Octopus rollout augmentation (arXiv 2602.08503, Sec. 3.2, Algorithm 1) and selective masks
(Sec. 4.3).

n generated rollouts become up to N = 2n training samples: the n originals, plus spliced
samples `o1_i + SC + o2_j` (i != j) chosen so that the group holds about as many positives as
negatives, wrong->correct pairs first. `loss_masks` then says which tokens each sample trains
in Stage I (o2 only, KL on o1) and Stage II (everything, except o1 + SC of w->c / c->w samples).

Read top-down: Algorithm 1 step by step (`split_rollout` splits and grades one rollout,
`candidate_pool` lists the splices, `select_pairs` picks them, `splice_group` runs the three),
then the masks of Sec. 4.3 (`loss_masks`), then how a splice is built, and last where o1, SC
and o2 sit among the sampled tokens (byte offsets of a byte-level BPE tokenizer).

Pure functions over token-id lists: no model, no engine, no process group.
"""

from __future__ import annotations

import bisect
import itertools
import random
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

from octopus import SC, sc_span, split_response
from reward import (
    Score,
    answer_span,
    correction_reward,
    format_reward,
    octopus_reward,
)


@dataclass
class SplitRollout:
    """One generated response (a rollout), split at SC into o1 / o2 and graded.

    `o1` / `o2`: token ids of each part cut right after its last `\\boxed{...}` (None when the
    part has no non-empty box, or, for `o2`, when there is no correction or o2 corrects itself
    again). `o1_sc_len`: how many leading tokens of `ids` are o1 + SC (a token straddling the
    boundary counts as o1 + SC), None without a correction; `o1_len`: how many are o1 alone (a
    straddling token is left out).
    """

    ids: list[int]
    o1: list[int] | None
    o2: list[int] | None
    o1_correct: bool
    o2_correct: bool
    final_correct: bool
    o1_sc_len: int | None  # tokens of o1 + SC; o2 starts at this index
    o1_len: int
    reward: float = 0.0  # the original's training reward (reward.score)
    o1_format: float = 0.0
    o2_format: float = 0.0


@dataclass
class Sample:
    """One training sample: an original rollout or a spliced `o1_i + SC + o2_j + EOS`."""

    ids: list[int]
    kind: str  # "original", "wc", "cc", "cw", "ww"
    o1_sc_len: int | None
    o1_correct: bool
    o2_correct: bool
    source: tuple[int, int]  # (i, j): o1 from rollout i, o2 from rollout j
    o1_len: int = 0
    reward: float = 0.0


# =============================================================================================
# Algorithm 1: split and grade, pool, select
# =============================================================================================


def split_rollout(ids: list[int], tokenizer, graded: Score) -> SplitRollout:
    """Split one sampled response at SC and label its parts (Algorithm 1, step 1), given its
    grades `graded` (`reward.score` / `reward.score_batch` of the response's text: grading is
    the caller's, so this module never runs the grader).

    `o1_sc_len` comes from character offsets of the sampled tokens (per-token byte lengths, or
    O(log n) prefix decodes for other tokenizers), so the original ids are never re-tokenized;
    `o1` / `o2` are the cut part texts, encoded. Linear in the response's length (up to the
    tokenizer's own encode and decode): a degenerate 1M-character response costs < 1 s.
    """
    body = list(ids)
    special = set(tokenizer.all_special_ids)
    while body and body[-1] in special:  # EOS / padding: not part of the text that is graded
        body.pop()
    text = tokenizer.decode(body, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    o1_text, o2_text = split_response(text)
    span = sc_span(text)
    if span is None:
        o1_sc_len, o1_len = None, len(body)
    else:
        ends = _byte_ends(tokenizer, body, text)
        o1_sc_len = _first_token_reaching(tokenizer, body, text, span[1], ends)
        o1_len = _last_token_within(tokenizer, body, text, len(text[: span[0]].rstrip()), ends)

    def encode(part: str | None) -> list[int] | None:
        cut = _cut_after_answer(part) if part is not None else None
        return None if cut is None else tokenizer.encode(cut, add_special_tokens=False)

    # an o2 that corrects itself again is o2 + SC + o3, not a part of the one-round format: it
    # is graded as sampled, but not spliced (the released code cuts such rollouts at the second SC)
    o2_part = None if o2_text is not None and sc_span(o2_text) is not None else o2_text

    o2_correct = bool(graded.acc_o2) if o2_text is not None else False
    return SplitRollout(
        ids=list(ids),
        o1=encode(o1_text),
        o2=encode(o2_part),
        o1_correct=bool(graded.acc_o1),
        o2_correct=o2_correct,
        final_correct=bool(graded.acc_final),
        o1_sc_len=o1_sc_len,
        o1_len=o1_len,
        reward=graded.reward,
        o1_format=format_reward(o1_text),
        o2_format=format_reward(o2_text) if o2_text is not None else 0.0,
    )


def transition_kind(o1_correct: bool, o2_correct: bool) -> str:
    """ "wc", "cc", "cw" or "ww": (acc(o1), acc(o2)) as the paper names them."""
    return ("c" if o1_correct else "w") + ("c" if o2_correct else "w")


def candidate_pool(
    rollouts: list[SplitRollout],
    *,
    same: bool = False,
    max_len: int | None = None,
    sc_len: int = 0,
) -> dict[str, list[tuple[int, int]]]:
    """Every pair (i, j) with an o1 in rollout i and an o2 in rollout j, by kind (Alg. 1 step 2).
    i = j pairs only with `same` (the released code keeps them; the paper does not). With
    `max_len`, pairs whose `spliced_len` (SC of `sc_len` tokens) exceeds it are left out."""
    pool: dict[str, list[tuple[int, int]]] = {"wc": [], "cc": [], "cw": [], "ww": []}
    for i, j, a, b in _pairs(rollouts, same):
        if max_len is None or spliced_len(a, b, sc_len) <= max_len:
            pool[transition_kind(a.o1_correct, b.o2_correct)].append((i, j))
    return pool


def select_pairs(
    pool: dict[str, list[tuple[int, int]]],
    k: int,
    n: int,
    n_target: int,
    mode: str,
    rng: random.Random,
) -> list[tuple[int, int]]:
    """Which candidates join the group (Alg. 1 step 3), given k correct originals out of n."""
    need = max(n_target - n, 0)
    shuffled = {kind: rng.sample(pairs, len(pairs)) for kind, pairs in pool.items()}
    every = [p for kind in ("wc", "cc", "cw", "ww") for p in pool[kind]]
    if mode == "none" or need == 0:
        return []
    if mode == "random" or (mode == "paper" and k in (0, n)):
        # all-correct or all-wrong groups: any mix, otherwise every advantage is the same sign
        return rng.sample(every, min(need, len(every)))
    if mode == "paper":
        positives = shuffled["wc"] + shuffled["cc"]  # w->c first: the rare, informative signal
        negatives = rng.sample(
            shuffled["cw"] + shuffled["ww"], len(shuffled["cw"]) + len(shuffled["ww"])
        )
        n_pos = min(max(n_target // 2 - k, 0), len(positives), need)
        n_neg = min(need - n_pos, len(negatives))
        n_pos = min(need - n_neg, len(positives))  # negatives ran short: more positives
        return positives[:n_pos] + negatives[:n_neg]
    if mode == "released":
        quota = (n - k) // 2
        take = shuffled["wc"][:quota] + shuffled["cc"][:quota] + shuffled["cw"][:1]
        rest = shuffled["ww"] + shuffled["cw"][1:] + shuffled["wc"][quota:] + shuffled["cc"][quota:]
        return (take + rest)[:need]
    raise ValueError(f"augment mode must be paper, released, random or none; got {mode!r}")


def splice_group(
    rollouts: list[SplitRollout],
    n_target: int,
    sc_ids: list[int],
    eos_id: int,
    *,
    tokenizer,
    rng: random.Random,
    concat_ids: bool = False,
    mode: str = "paper",
    max_len: int | None = None,
) -> list[Sample]:
    """The training group of one prompt (arXiv 2602.08503, Sec. 3.2, Algorithm 1): the n
    originals first and unchanged, then spliced samples `o1_i + SC + o2_j + EOS` (SC's ids
    `sc_ids`, EOS `eos_id`), no pair twice; `rng` draws the selection.

    `tokenizer` encodes each splice as one text, `o1 + SC + o2`, as the model would have
    sampled it (its masks then come from the byte offsets of its tokens, as an original's).
    `concat_ids=True` instead concatenates the parts' ids, as the released code does (the
    tokenizer is then unused and may be None): the boundary holds `}` + `\\n` + `\\n` where
    sampling writes the single token `}\\n\\n`, and training on token paths that the model
    never samples breaks its format at temperature 1.0 (README: "The demo").

    `mode`: "paper" (balance positives and negatives, w->c first), "released" (the authors'
    code: quotas of (n - k) // 2 w->c and c->c, one c->w, then w->w, more c->w, the rest;
    i = j pairs allowed; a short pool padded to `n_target` by repeating originals), "random",
    "none". Only "released" pads: a duplicate carries no new information, yet it counts twice
    in the group's reward mean and std and twice in the loss.

    `max_len`: a candidate whose spliced sample is longer never enters the pool, so the
    selection picks among the others (`count_overlong` says how many were left out). o1 of one
    long rollout plus o2 of another can reach about twice the generation limit; the released
    code clips such samples, which cuts off the o2 answer that the reward graded. None: no limit.
    """
    if tokenizer is None and not concat_ids:
        raise ValueError("splice_group: pass the tokenizer, or concat_ids=True for id splices")
    n = len(rollouts)
    k = sum(r.final_correct for r in rollouts)
    group = [_original(r, i) for i, r in enumerate(rollouts)]
    pool = candidate_pool(rollouts, same=mode == "released", max_len=max_len, sc_len=len(sc_ids))
    encoder = None if concat_ids else _SpliceEncoder(tokenizer)
    for i, j in select_pairs(pool, k, n, n_target, mode, rng):
        group.append(_splice(rollouts, i, j, sc_ids, eos_id, encoder))
    if mode == "released" and n > 0:
        while len(group) < n_target:
            group.append(group[(len(group) - n) % n])
    return group


# =============================================================================================
# Sec. 4.3: selective masks
# =============================================================================================


def loss_masks(sample: Sample, stage: str) -> tuple[list[int], list[int]]:
    """Per-token `(policy_mask, kl_mask)` over `sample.ids` (Sec. 4.3, selective masking).

    Stage "1": o1 + SC get no policy gradient in every sample with a correction, and the KL to
    the reference covers the o1 tokens only. Stage "2": o1 + SC are masked only when o1 and o2
    disagree in correctness (w->c, c->w); no KL. Without a correction: all trained, no KL.
    Masked tokens stay in the context: the masks only select terms of the loss.
    """
    n = len(sample.ids)
    if sample.o1_sc_len is None:
        return [1] * n, [0] * n
    cut = sample.o1_sc_len
    if stage == "1":
        return [0] * cut + [1] * (n - cut), [1] * sample.o1_len + [0] * (n - sample.o1_len)
    if stage == "2":
        if sample.o1_correct != sample.o2_correct:
            return [0] * cut + [1] * (n - cut), [0] * n
        return [1] * n, [0] * n
    raise ValueError(f"stage must be '1' or '2', got {stage!r}")


def transition_counts(samples: list[Sample] | list[SplitRollout]) -> dict[str, int]:
    """Counts of w->c, c->c, c->w, w->w among samples with a correction, and of those without:
    the density of self-correction signal before and after augmentation."""
    counts = {"wc": 0, "cc": 0, "cw": 0, "ww": 0, "none": 0}
    for s in samples:
        counts["none" if s.o1_sc_len is None else transition_kind(s.o1_correct, s.o2_correct)] += 1
    return counts


# =============================================================================================
# Splices: o1_i + SC + o2_j, their lengths and encodings
# =============================================================================================


def spliced_len(a: SplitRollout, b: SplitRollout, sc_len: int) -> int:
    """Tokens of the spliced sample `a.o1 + SC + b.o2 + EOS`, with `sc_len` tokens of SC."""
    return len(a.o1) + sc_len + len(b.o2) + 1


def count_overlong(
    rollouts: list[SplitRollout], sc_ids: list[int], max_len: int, *, mode: str = "paper"
) -> int:
    """How many candidates `splice_group(..., mode=mode, max_len=max_len)` left out of the pool
    of this group because their spliced sample would exceed `max_len` tokens. O(n^2) length
    sums over the group's n rollouts: cheap enough to log every step. 0 for mode "none"."""
    if mode == "none":
        return 0
    return sum(
        spliced_len(a, b, len(sc_ids)) > max_len
        for _, _, a, b in _pairs(rollouts, mode == "released")
    )


def _pairs(
    rollouts: list[SplitRollout], same: bool
) -> Iterator[tuple[int, int, SplitRollout, SplitRollout]]:
    for i, a in enumerate(rollouts):
        for j, b in enumerate(rollouts):
            if a.o1 is not None and b.o2 is not None and (i != j or same):
                yield i, j, a, b


def _original(r: SplitRollout, i: int) -> Sample:
    return Sample(
        r.ids, "original", r.o1_sc_len, r.o1_correct, r.o2_correct, (i, i), r.o1_len, r.reward
    )


def _splice(
    rollouts: list[SplitRollout],
    i: int,
    j: int,
    sc_ids: list[int],
    eos_id: int,
    encoder: _SpliceEncoder | None,
) -> Sample:
    """Sample `o1_i + SC + o2_j + EOS` and its Eq. 6 reward; `encoder` None: the parts' ids
    side by side (`splice_group(concat_ids=True)`, the released code's splice)."""
    a, b = rollouts[i], rollouts[j]
    r_prime = correction_reward(
        a.o1_correct, b.o2_correct, identical=a.o1 == b.o2, o1_answered=True, o2_format=b.o2_format
    )
    if encoder is None:
        ids, o1_sc_len, o1_len = a.o1 + sc_ids + b.o2 + [eos_id], len(a.o1) + len(sc_ids), len(a.o1)
    else:
        ids, o1_sc_len, o1_len = encoder(i, a.o1, b.o2, eos_id)
    return Sample(
        ids=ids,
        kind=transition_kind(a.o1_correct, b.o2_correct),
        o1_sc_len=o1_sc_len,
        o1_correct=a.o1_correct,
        o2_correct=b.o2_correct,
        source=(i, j),
        o1_len=o1_len,
        reward=octopus_reward(r_prime, a.o1_format, b.o2_format),
    )


class _SpliceEncoder:
    """`o1 + SC + o2` encoded as one text, as the model would have sampled it (the parts
    encoded apart leave `}` + `\\n` + `\\n` where sampling writes `}\\n\\n`), with its o1 + SC
    and o1 token counts from the byte offsets of the encoded tokens. One per group.

    When o2 starts with an added token (`<think>` in Qwen's tokenizers and the tiny one), the
    tokenizer splits the text there before any merge, so the encoding of `o1 + SC` (the same
    for every splice of one o1: encoded once per rollout) followed by o2's own ids is exactly
    the encoding of the whole text; otherwise the whole text is encoded."""

    _DECODE = dict(skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.added = frozenset(tokenizer.get_added_vocab().values())
        self.prefixes: dict[int, tuple[str, list[int], int, int]] = {}  # rollout -> o1 + SC

    def __call__(
        self, i: int, o1: list[int], o2: list[int], eos_id: int
    ) -> tuple[list[int], int, int]:
        """(ids, o1_sc_len, o1_len) of the splice of rollout `i`'s `o1` and another's `o2`."""
        if i not in self.prefixes:
            text = self.tokenizer.decode(o1, **self._DECODE) + SC
            self.prefixes[i] = (text, *self._encode(text))
        text, prefix, o1_sc_len, o1_len = self.prefixes[i]
        if o2 and o2[0] in self.added:
            return [*prefix, *o2, eos_id], o1_sc_len, o1_len
        ids, o1_sc_len, o1_len = self._encode(text + self.tokenizer.decode(o2, **self._DECODE))
        return [*ids, eos_id], o1_sc_len, o1_len

    def _encode(self, text: str) -> tuple[list[int], int, int]:
        """(ids, o1_sc_len, o1_len) of a text that holds an SC."""
        tok = self.tokenizer
        ids = tok.encode(text, add_special_tokens=False)
        span = sc_span(text)
        ends = _byte_ends(tok, ids, text)
        o1_sc_len = _first_token_reaching(tok, ids, text, span[1], ends)
        o1_len = _last_token_within(tok, ids, text, len(text[: span[0]].rstrip()), ends)
        return ids, o1_sc_len, o1_len


# =============================================================================================
# Token offsets: where o1, SC and o2 end among the sampled tokens
# =============================================================================================


def _cut_after_answer(part: str) -> str | None:
    span = answer_span(part)
    if span is None or not part[span[0] : span[1]].strip():
        return None
    return part[: span[1] + 1]


def _byte_level_bytes() -> dict[str, int]:
    """The byte each of the 256 characters of byte-level BPE (GPT-2, Qwen) spells."""
    keep = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    extra = [b for b in range(256) if b not in keep]
    return {chr(b): b for b in keep} | {chr(256 + i): b for i, b in enumerate(extra)}


# Keyed by the tokenizer object, weakly: an entry goes with its tokenizer, so a later tokenizer
# that Python places at the same address (the same `id`) never reads another's table.
_TOKEN_BYTES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _token_bytes(tokenizer) -> list[bytes] | None:
    """Raw bytes of every token id (an added token: its UTF-8 text), or None for a tokenizer
    that is not byte-level BPE. Built once per tokenizer: one list lookup per token afterwards."""
    if tokenizer not in _TOKEN_BYTES:
        byte_of, added = _byte_level_bytes(), tokenizer.get_added_vocab()
        added_ids = {i: t.encode("utf-8") for t, i in added.items()}
        table: list[bytes] | None = []
        for i, tok in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
            if i in added_ids:
                table.append(added_ids[i])
            elif tok is not None and all(ch in byte_of for ch in tok):
                table.append(bytes(byte_of[ch] for ch in tok))
            else:
                table = None
                break
        _TOKEN_BYTES[tokenizer] = table
    return _TOKEN_BYTES[tokenizer]


def _byte_ends(tokenizer, ids: list[int], text: str) -> list[int] | None:
    """Byte offset where each token ends in `text` (the decode of `ids`); None when that is
    not exact: not byte-level BPE, or sampled bytes that are not valid UTF-8 (decoded as
    U+FFFD). A U+FFFD the model spelled in valid bytes is exact. Linear in `len(ids)`."""
    table = _token_bytes(tokenizer)
    if table is None or (ids and max(ids) >= len(table)):
        return None
    pieces = [table[i] for i in ids]
    if b"".join(pieces) != text.encode("utf-8"):
        return None
    return list(itertools.accumulate(map(len, pieces)))


def _prefix_chars(tokenizer, ids: list[int], k: int) -> int:
    return len(
        tokenizer.decode(ids[:k], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    )


def _first_token_reaching(
    tokenizer, ids: list[int], text: str, char: int, ends: list[int] | None
) -> int:
    """Smallest k such that the first k tokens decode to at least `char` characters."""
    if char <= 0:
        return 0
    if ends is not None:
        return bisect.bisect_left(ends, len(text[:char].encode("utf-8"))) + 1
    lo, hi = 0, len(ids)
    while lo < hi:  # fallback: O(log n) prefix decodes; no re-tokenization of the sampled text
        mid = (lo + hi) // 2
        if _prefix_chars(tokenizer, ids, mid) >= char:
            hi = mid
        else:
            lo = mid + 1
    return lo


def _last_token_within(
    tokenizer, ids: list[int], text: str, char: int, ends: list[int] | None
) -> int:
    """Largest k such that the first k tokens decode to at most `char` characters."""
    if ends is not None:
        return bisect.bisect_right(ends, len(text[:char].encode("utf-8")))
    k = _first_token_reaching(tokenizer, ids, text, char, None)
    return k if k == 0 or _prefix_chars(tokenizer, ids, k) <= char else k - 1
