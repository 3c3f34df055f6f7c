"""A tiny random Qwen3-VL checkpoint, built on local disk (no download).

Everything that needs a model runs on it here: it is saved in the Hugging Face layout of
Qwen3-VL-8B (config, safetensors, tokenizer, processor, chat template) and loaded back through
the same classes (`Qwen3VLForConditionalGeneration`, `AutoProcessor`, vLLM's Qwen3-VL).
Sizes: ~1M parameters, head_dim 32 (vLLM's CPU attention rejects 16),
96x96 images -> 9 visual tokens. Imports nothing from the project.

    python tiny.py [PATH]      # build (idempotent) and print the path
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile

VERSION = "tiny-qwen3vl-v2"  # bump when the recipe changes: cached copies are rebuilt
DEFAULT_PATH = os.path.join(
    os.environ.get("OCTOPUS_CACHE", os.path.expanduser("~/.cache/octopus")), VERSION
)

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
THINK_TOKENS = ["<think>", "</think>"]  # added, not special: decoding keeps them (as Qwen3's)
SC = "\n\n<self-correction>\n</self-correction>\n\n"  # octopus.SC; tiny.py imports nothing
# Qwen2/3's pre-tokenizer split: punctuation keeps its trailing newlines ("}\n\n" can be one
# token), which is exactly the case the o1/SC/o2 boundary code must handle.
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
VOCAB_SIZE = 2048

# Qwen3-VL's chat template, reduced to what Octopus uses: text and images in user turns.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for item in message['content'] %}"
    "{%- if item['type'] == 'image' or 'image' in item %}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif item['type'] == 'video' or 'video' in item %}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif item['type'] == 'text' %}{{- item['text'] }}"
    "{%- endif %}{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_WORDS = (
    "the a an of to in is are how many what which find value answer image shown figure dots "
    "count number total sum add plus minus times digit digits read left right top bottom black "
    "white red blue green circle square triangle angle side length area perimeter degrees units "
    "first then so therefore because there think through reasoning process internal monologue "
    "enclosed within tags provide final boxed if you believe can be further enhanced generate "
    "self-correction no content regenerate new from scratch after that response should all "
    "steps must included without omission let me check again wait I see one two three four "
    "five six seven eight nine ten question options choose correct yes"
).split()


def _corpus(n_lines: int = 4000, seed: int = 0) -> list[str]:
    """Text shaped like prompts and answers, so frequent pieces get their own tokens."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 20)))
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        lines.append(f"<think>\n{words} {a} + {b} = {a + b}.\n</think>\n\n\\boxed{{{a + b}}}")
        lines.append(f"How many dots are in the image? {words}. \\frac{{{a}}}{{{b + 1}}}")
        lines.append(
            f"<think>{words}</think>\n\n\\boxed{{{a}}}"
            + SC
            + f"<think>{words}</think>\n\n\\boxed{{{b}}}"
        )
    return lines


def build_tokenizer(path: str):
    """Byte-level BPE (as Qwen's) trained on the synthetic corpus, with Qwen's special tokens."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - len(SPECIAL_TOKENS) - len(THINK_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=SPECIAL_TOKENS[1:],
        model_max_length=32768,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    return fast


def build_processor(path: str, tokenizer, *, min_tokens: int = 4, max_tokens: int = 16):
    """Qwen3-VL processor: patch 16, merge 2 (1024 pixels per visual token), 4-16 tokens."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

    pixels = {"shortest_edge": min_tokens * 32 * 32, "longest_edge": max_tokens * 32 * 32}
    common = dict(patch_size=16, temporal_patch_size=2, merge_size=2)
    mean_std = dict(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    image = Qwen2VLImageProcessor(size=pixels, **common, **mean_std)
    video = Qwen3VLVideoProcessor(size=pixels, **common, **mean_std)
    processor = Qwen3VLProcessor(image, tokenizer, video, chat_template=CHAT_TEMPLATE)
    processor.save_pretrained(path)
    return processor


def tiny_config(tokenizer):
    """~1M parameters: text hidden 128 x 2 layers, head_dim 32; vision hidden 64 x 2 blocks."""
    from transformers import Qwen3VLConfig

    ids = tokenizer.convert_tokens_to_ids
    text = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=4096,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [6, 5, 5],  # sums to head_dim / 2
            "mrope_interleaved": True,
        },
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=ids("<|im_end|>"),
        pad_token_id=ids("<|endoftext|>"),
    )
    vision = dict(
        depth=2,
        hidden_size=64,
        intermediate_size=128,
        num_heads=2,
        patch_size=16,
        spatial_merge_size=2,
        temporal_patch_size=2,
        out_hidden_size=128,
        num_position_embeddings=64,
        deepstack_visual_indexes=[0],
    )
    return Qwen3VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )


def build_tiny(path: str = DEFAULT_PATH, *, seed: int = 0) -> str:
    """Write the tiny checkpoint to `path` once; later calls return at once. Safe to call from
    several processes: each builds in a temporary folder and the first rename wins."""
    marker = os.path.join(path, "tiny.json")
    if os.path.exists(marker):
        return path
    import torch
    from transformers import GenerationConfig, Qwen3VLForConditionalGeneration

    parent = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tiny-", dir=parent)
    try:
        tokenizer = build_tokenizer(tmp)
        build_processor(tmp, tokenizer)
        torch.manual_seed(seed)
        model = Qwen3VLForConditionalGeneration(tiny_config(tokenizer)).float()
        model.generation_config = GenerationConfig(
            eos_token_id=[
                tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")
            ],
            pad_token_id=tokenizer.pad_token_id,
            do_sample=True,
        )
        model.save_pretrained(tmp)
        n_params = sum(p.numel() for p in model.parameters())
        with open(os.path.join(tmp, "tiny.json"), "w") as f:
            json.dump({"version": VERSION, "parameters": n_params, "seed": seed}, f)
        try:
            os.rename(tmp, path)
        except OSError:  # another process finished first: keep its copy
            if not os.path.exists(marker):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", nargs="?", default=DEFAULT_PATH, help="where to build it")
    print(build_tiny(parser.parse_args().path))
