"""tiny.py builds a real Qwen3-VL checkpoint; data.py reads every supported source."""

import base64
import io
import json
import os
import random

import pytest
from PIL import Image

from data import (
    DataError,
    EncodedImage,
    decode_example,
    decode_examples,
    dots_image,
    encode_image,
    load_examples,
    row_to_example,
    synthetic_coldstart,
    synthetic_task,
    target_size,
)
from octopus import BASELINE_SUFFIX, OCTOPUS_SUFFIX, split_response
from reward import score
from tiny import build_tiny


def test_tiny_loads_with_the_real_classes(tiny_path, processor):
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    assert type(processor).__name__ == "Qwen3VLProcessor"
    model = Qwen3VLForConditionalGeneration.from_pretrained(tiny_path)
    n_params = sum(p.numel() for p in model.parameters())
    assert 0.5e6 < n_params < 2e6
    assert model.config.text_config.head_dim == 32
    example = synthetic_task(1, seed=3)[0]
    text = processor.apply_chat_template(example["messages"], add_generation_prompt=True)
    assert text.startswith("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>")
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    images = [example["messages"][0]["content"][0]["image"]]
    inputs = processor(text=[text], images=images, return_tensors="pt")
    n_visual = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert 4 <= n_visual <= 16  # 96x96 -> 9 visual tokens
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], model.config.text_config.vocab_size)
    assert torch.isfinite(logits).all()


def test_tiny_build_is_idempotent(tiny_path):
    stamp = os.path.getmtime(os.path.join(tiny_path, "model.safetensors"))
    assert build_tiny(tiny_path) == tiny_path
    assert os.path.getmtime(os.path.join(tiny_path, "model.safetensors")) == stamp


def test_tokenizer_round_trip_and_specials(tokenizer):
    text = "<think>\nThere are 3 dots.\n</think>\n\n\\boxed{3}\n\n<self-correction>\n</self-correction>\n\n"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    assert tokenizer.convert_ids_to_tokens(ids[0]) == "<think>"  # one token, not split
    assert tokenizer.eos_token == "<|im_end|>"
    assert "<|image_pad|>" in tokenizer.all_special_tokens
    assert len(tokenizer) <= 2048


# --------------------------------------------------------------------------- data sources


def _png_bytes(color="red", size=(64, 48)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def rows_dir(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(_png_bytes("red"))
    b64 = base64.b64encode(_png_bytes("blue")).decode()
    rows = [
        {"qid": "v1", "question": "<image>What colour?", "answer": "red", "image": ["img/a.png"]},
        {"problem": "Find x. <image>", "answer": "3", "images": [{"bytes": _png_bytes("green")}]},
        {"question": "Which?", "answer": "B", "images": [f"data:image/png;base64,{b64}"]},
        {"question": "no answer here", "image": "img/a.png"},
        {"question": "broken image", "answer": "1", "image": "img/missing.png"},
        {"question": "corrupt bytes", "answer": "1", "images": [{"bytes": b"not a png"}]},
        {"question": "text only", "answer": "7", "category": "algebra"},
    ]
    return tmp_path, rows


def _check(examples, report, file):
    assert report.rows == 7 and report.kept == 4 and len(report.skipped) == 3
    assert any(f"{file}:row 4: no answer" in s for s in report.skipped)
    assert any("row 5: field image[0]" in s for s in report.skipped)
    assert any("row 6: field images[0]: unreadable image" in s for s in report.skipped)
    # loaded examples hold the encoded file and the size it will have; pixels come in the step
    images = [
        c["image"] for e in examples for c in e["messages"][0]["content"] if c["type"] == "image"
    ]
    assert len(images) == 3 and all(isinstance(im, EncodedImage) for im in images)
    # 64x48 scaled up into [256, 1280] x 28 x 28 pixels, 4:3 kept, sides multiples of 32
    assert all(im.size == (544, 416) for im in images)
    examples = [decode_example(e) for e in examples]
    assert [im.size for im in images] == [
        c["image"].size
        for e in examples
        for c in e["messages"][0]["content"]
        if c["type"] == "image"
    ]
    first = examples[0]
    assert first["id"] == "v1" and first["answer"] == "red"
    content = first["messages"][0]["content"]
    assert content[0]["type"] == "image" and content[0]["image"].getpixel((0, 0)) == (255, 0, 0)
    assert content[1] == {"type": "text", "text": "What colour?" + OCTOPUS_SUFFIX}
    # the <image> tag after the text keeps the image after the text
    second = examples[1]["messages"][0]["content"]
    assert [c["type"] for c in second] == ["text", "image", "text"]
    assert examples[2]["messages"][0]["content"][0]["image"].getpixel((0, 0)) == (0, 0, 255)
    assert examples[3]["category"] == "algebra"
    for ex in examples:
        for c in ex["messages"][0]["content"]:
            if c["type"] == "image":
                w, h = c["image"].size
                assert w % 32 == 0 and h % 32 == 0


def test_jsonl_source(rows_dir):
    d, rows = rows_dir
    path = d / "train.jsonl"

    def as_json(value):  # JSON has no bytes: HF image dicts carry base64 there
        if isinstance(value, bytes):
            return base64.b64encode(value).decode()
        if isinstance(value, (list, dict)):
            items = value.items() if isinstance(value, dict) else enumerate(value)
            out = {} if isinstance(value, dict) else [None] * len(value)
            for k, v in items:
                out[k] = as_json(v)
            return out
        return value

    path.write_text("\n".join(json.dumps(as_json(r)) for r in rows) + "\n")
    _check(*load_examples(str(path)), str(path))


def _columnar(rows):
    """One type per column, as parquet/arrow need: `image` paths as lists, `images` as HF
    image dicts (bytes or path)."""
    out = []
    for r in rows:
        r = dict(r)
        if isinstance(r.get("image"), str):
            r["image"] = [r["image"]]
        if r.get("images"):
            r["images"] = [
                v if isinstance(v, dict) else {"bytes": None, "path": v} for v in r["images"]
            ]
            r["images"] = [{"bytes": v.get("bytes"), "path": v.get("path")} for v in r["images"]]
        out.append(r)
    keys = {k for r in out for k in r}  # from_pylist takes its columns from the first row
    return [{k: r.get(k) for k in sorted(keys)} for r in out]


def test_parquet_source(rows_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    d, rows = rows_dir
    path = d / "train.parquet"
    pq.write_table(pa.Table.from_pylist(_columnar(rows)), path)
    _check(*load_examples(str(path)), str(path))


def test_hf_save_to_disk_folder(rows_dir):
    import pyarrow as pa

    d, rows = rows_dir
    folder = d / "hf" / "train"
    folder.mkdir(parents=True)
    # the folder's images are relative to the arrow file, as datasets stores them
    (folder / "img").mkdir()
    (folder / "img" / "a.png").write_bytes(_png_bytes("red"))
    table = pa.Table.from_pylist(_columnar(rows))
    arrow = folder / "data-00000-of-00001.arrow"
    with pa.OSFile(str(arrow), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    (folder / "dataset_info.json").write_text("{}")
    (folder / "state.json").write_text("{}")
    _check(*load_examples(str(d / "hf"), split="train"), str(arrow))


def test_invalid_json_line_is_reported(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(
        '{"question": "q", "answer": "1"}\n{oops\n\n{"question": "q2", "answer": "2"}\n'
    )
    examples, report = load_examples(str(path))
    assert [e["answer"] for e in examples] == ["1", "2"]
    assert report.skipped == [
        f"{path}:row 2: invalid JSON (Expecting property name enclosed in double quotes)"
    ]


def test_image_sources_and_errors(tmp_path):
    png = _png_bytes()
    (tmp_path / "x.png").write_bytes(png)
    for value in ["x.png", str(tmp_path / "x.png"), png, base64.b64encode(png).decode(),
                  {"path": "x.png"}, Image.open(io.BytesIO(png))]:  # fmt: skip
        image = encode_image(value, str(tmp_path), 1, 10**7)
        assert image.size == target_size(64, 48, 1, 10**7) == (64, 64)  # sides: multiples of 32
        pixels = image.decode() if isinstance(image, EncodedImage) else image
        assert pixels.size == (64, 64) and pixels.mode == "RGB"
    for bad, msg in [("nope.png", "not a file and not base64"), (b"garbage", "unreadable image"),
                     ({}, "neither bytes nor path"), (3, "unsupported image")]:  # fmt: skip
        with pytest.raises(ValueError, match=msg):
            encode_image(bad, str(tmp_path), 1, 10**7)


def test_min_max_pixels_and_tag_mismatch(tmp_path):
    (tmp_path / "big.png").write_bytes(_png_bytes(size=(4000, 3000)))
    row = {"question": "q", "answer": "1", "image": "big.png"}
    ex = row_to_example(row, where="r", base_dir=str(tmp_path), max_pixels=1280 * 28 * 28)
    w, h = ex["messages"][0]["content"][0]["image"].size
    assert w * h <= 1280 * 28 * 28 and abs(w / h - 4 / 3) < 0.1
    assert decode_example(ex)["messages"][0]["content"][0]["image"].size == (w, h)
    with pytest.raises(DataError, match="2 <image> tags but 1 images"):
        row_to_example(dict(row, question="<image><image>q"), where="r", base_dir=str(tmp_path))
    ex = row_to_example(row, where="r", base_dir=str(tmp_path), suffix=BASELINE_SUFFIX)
    assert ex["messages"][0]["content"][-1]["text"].endswith(BASELINE_SUFFIX)


def test_an_image_broken_past_its_header_is_found_in_the_step(tmp_path):
    """A truncated PNG has a readable header (the load keeps the row: size known, no pixels
    read) and fails when the step decodes it: that example is left out and named, the others
    go on; the file is read at decode time, not held in memory."""
    good, broken = _png_bytes("red", (300, 200)), _png_bytes("blue", (300, 200))
    (tmp_path / "good.png").write_bytes(good)
    (tmp_path / "cut.png").write_bytes(broken[: len(broken) // 2])
    rows = [{"id": "a", "question": "q", "answer": "1", "image": "good.png"},
            {"id": "b", "question": "q", "answer": "2", "image": "cut.png"},
            {"id": "c", "question": "q", "answer": "3", "images": [base64.b64encode(good).decode()]}]  # fmt: skip
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    examples, report = load_examples(str(path))
    assert report.kept == 3 and not report.skipped
    held = [e["messages"][0]["content"][0]["image"] for e in examples]
    assert held[0].data == str(tmp_path / "good.png") and held[2].data == good
    kept, bad = decode_examples(examples)
    assert [e["id"] for e in kept] == ["a", "c"] and len(bad) == 1
    assert bad[0].startswith(f"b: {path}:row 2: field image[0]: unreadable image")
    assert kept[0]["messages"][0]["content"][0]["image"].getpixel((5, 5)) == (255, 0, 0)
    with pytest.raises(DataError, match="row 2: field image"):
        decode_example(examples[1])
    # a decoded (PIL) example passes through unchanged
    assert (
        decode_example(kept[0])["messages"][0]["content"][0]["image"]
        is (kept[0]["messages"][0]["content"][0]["image"])
    )


# --------------------------------------------------------------------------- synthetic task


def _count_dots(image: Image.Image) -> int:
    """Independent count: connected black blobs by flood fill."""
    px, (w, h) = image.load(), image.size
    seen, blobs = set(), 0
    for x in range(w):
        for y in range(h):
            if px[x, y] == (0, 0, 0) and (x, y) not in seen:
                blobs += 1
                stack = [(x, y)]
                while stack:
                    a, b = stack.pop()
                    if (a, b) in seen or not (0 <= a < w and 0 <= b < h) or px[a, b] != (0, 0, 0):
                        continue
                    seen.add((a, b))
                    stack += [(a + 1, b), (a - 1, b), (a, b + 1), (a, b - 1)]
    return blobs


def test_synthetic_task_answers_match_images():
    examples = synthetic_task(40, seed=1)
    answers = [e["answer"] for e in examples]
    assert answers == [e["answer"] for e in synthetic_task(40, seed=1)]  # deterministic
    assert set(answers) <= {str(k) for k in range(1, 7)} and len(set(answers)) >= 4
    for e in examples:
        image = e["messages"][0]["content"][0]["image"]
        assert image.size == (96, 96)
        assert _count_dots(image) == int(e["answer"])
    assert _count_dots(dots_image(6, random.Random(0))) == 6


def test_synthetic_coldstart_responses_are_graded_as_intended():
    rng = random.Random(0)
    for e in synthetic_task(30, seed=2):
        response = synthetic_coldstart(e, rng)
        o1, o2 = split_response(response)
        s = score(response, e["answer"])
        assert o2 is not None and s.format == 1.0
