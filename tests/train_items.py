"""Fixed training groups for the gradient checks run under torchrun (test_train, test_gpu)."""

import math

import torch

import train
from augment import Sample
from data import synthetic_task
from packing import encode_prompt
from rollout import render_prompt


def fixed_groups(processor, n_groups=6, seed=5):
    """Groups of random responses with Stage I-style masks and random old / reference log-probs.
    The reference log-probs sit near a random model's, -log(vocabulary) (+- 0.5): far from the
    policy, the k3 KL clamps at 10, where it has no gradient and a KL bug would go unseen."""
    g = torch.Generator().manual_seed(0)
    plain = min(processor.tokenizer.all_special_ids)
    near = -math.log(len(processor.tokenizer))
    groups = []
    for k, ex in enumerate(synthetic_task(n_groups, seed=seed)):
        prompt = encode_prompt(processor, render_prompt(processor, ex["messages"]))
        group = train.Group(ex, prompt, [], [], [], old_logps=[], ref_logps=[])
        for j in range(1 + k % 3):
            n = 5 + 3 * k + j
            cut = (k + j) % 3
            ids = torch.randint(0, plain, (n,), generator=g).tolist()
            group.samples.append(Sample(ids, "original", None, False, False, (j, j)))
            group.advantages.append(float(torch.randn(1, generator=g)))
            group.policy_masks.append(torch.tensor([0.0] * cut + [1.0] * (n - cut)))
            group.kl_masks.append(torch.tensor([1.0] * (cut // 2) + [0.0] * (n - cut // 2)))
            group.old_logps.append(-torch.rand(n, generator=g) * 5)
            group.ref_logps.append(near + 0.5 * torch.randn(n, generator=g))
        groups.append(group)
    return groups
