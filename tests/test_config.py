"""config.py: the presets of the paper's runs and the one decision about the reference model."""

import pytest

from config import PRESETS, Config, preset


def test_presets_and_overrides():
    for name in PRESETS:
        cfg = preset(name)
        assert cfg.n_train >= cfg.n_rollouts
    assert preset("gspo-n16").n_rollouts == 16 and preset("gspo-n16").augment == "none"
    assert preset("octopus-8b-stage1", lr=2e-6).lr == 2e-6
    # GRPO / DAPO clip 0.2 / 0.28 (the paper's setup); the released GRPO script: 0.2 / 0.3 + KL
    assert preset("grpo-n8").ratio == "token" and preset("grpo-n8").clip_high == 0.28
    released = preset("grpo-n16-released")
    assert (released.clip_high, released.kl_coef, released.kl_tokens) == (0.3, 0.01, "response")
    assert (released.weight_decay, released.warmup_steps) == (0.01, 0)
    assert preset("dapo-n16").clip_high == 0.28 and preset("dapo-n16").agg == "token"
    assert preset("dapo-n16").clip_dual == 10.0  # the released DAPO script's dual clip
    assert (
        preset("octopus-8b-stage1").clip_low == 3e-4 and preset("octopus-8b-stage1").n_train == 16
    )
    with pytest.raises(ValueError, match="unknown Config field"):
        preset("gspo-n8", learning_rate=1.0)
    with pytest.raises(ValueError, match="unknown preset"):
        preset("nope")


@pytest.mark.parametrize(
    "stage, kl_coef, kl_tokens, expected",
    [
        ("1", 0.01, "o1", True),  # Stage I: KL on o1 (Sec. 4.3)
        ("1", 0.0, "o1", False),  # no KL, no reference
        ("2", 0.01, "o1", False),  # Stage II has no KL on o1
        ("2", 0.01, "response", True),  # a baseline with a KL on every response token
        ("2", 0.0, "response", False),
        ("sft", 0.01, "response", False),  # the cold start never has one
    ],
)
def test_uses_reference_is_decided_in_one_place(stage, kl_coef, kl_tokens, expected):
    cfg = Config(stage=stage, kl_coef=kl_coef, kl_tokens=kl_tokens)
    assert cfg.uses_reference is expected


def test_the_presets_use_a_reference_where_the_paper_does():
    assert preset("octopus-8b-stage1").uses_reference  # Stage I
    assert not preset("octopus-8b-stage2").uses_reference  # Stage II
    assert preset("grpo-n16-released").uses_reference  # the released GRPO: KL on responses
    assert not any(preset(n).uses_reference for n in ("gspo-n8", "gspo-n16", "sft", "demo-2"))
