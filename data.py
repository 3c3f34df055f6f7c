"""Dataset rows -> chat examples with images (the paper trains on ViRL-39K and validates on
Geometry3K), and the synthetic visual task of the CPU demo.

An example is a plain dict: `{"id", "messages", "answer", "category"?}` where `messages` is a
chat whose user turn holds `{"type": "image", "image": PIL.Image}` and `{"type": "text"}`
items, ready for the processor's chat template. A bad row (no answer, unreadable image) is
reported with its file, row number and field, counted, and never silently dropped.
"""

from __future__ import annotations

import base64
import binascii
import glob
import io
import json
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

from PIL import Image, ImageDraw

from octopus import OCTOPUS_SUFFIX, SC

IMAGE_FACTOR = 32  # Qwen3-VL: patch 16 x spatial merge 2 pixels per visual token side
QUESTION_FIELDS = ("question", "problem", "prompt", "query")
ANSWER_FIELDS = ("answer", "ground_truth", "solution")
IMAGE_FIELDS = ("images", "image", "image_path", "image_paths")
MAX_IMAGE_BYTES = 64 * 1024**2


class DataError(ValueError):
    """A row that cannot become an example; the message names the file, row and field."""


@dataclass
class LoadReport:
    """What a load read, kept and skipped (with why), so nothing is dropped unseen."""

    rows: int = 0
    kept: int = 0
    skipped: list[str] = field(default_factory=list)

    def summary(self) -> str:
        head = f"{self.kept}/{self.rows} rows kept, {len(self.skipped)} skipped"
        return head + "".join(f"\n  {s}" for s in self.skipped[:20])


# ---------------------------------------------------------------------------------------------
# Reading rows: JSONL / JSON, parquet, HF dataset folders (save_to_disk arrow or hub parquet)
# ---------------------------------------------------------------------------------------------


def _data_files(path: str, split: str | None) -> list[str]:
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise FileNotFoundError(f"dataset not found: {path}")
    files = []
    for ext in ("arrow", "parquet", "jsonl", "json"):
        files += glob.glob(os.path.join(path, "**", f"*.{ext}"), recursive=True)
    files = sorted(f for f in files if os.path.basename(f) not in ("dataset_info.json", "state.json",
                                                                    "dataset_dict.json"))  # fmt: skip
    if split:
        files = [f for f in files if split in os.path.relpath(f, path)]
    if not files:
        raise FileNotFoundError(f"no .arrow/.parquet/.jsonl/.json data files under {path}")
    return files


def _arrow_rows(path: str) -> Iterator[dict]:
    import pyarrow as pa

    with open(path, "rb") as f:
        try:
            reader = pa.ipc.open_stream(f)  # datasets' save_to_disk writes the stream format
        except pa.ArrowInvalid:
            f.seek(0)
            reader = pa.ipc.open_file(f)
            for i in range(reader.num_record_batches):
                yield from reader.get_batch(i).to_pylist()
            return
        for batch in reader:
            yield from batch.to_pylist()


def _file_rows(path: str) -> Iterator[tuple[int, dict | str]]:
    """(row number, row) pairs; a row that is not even valid JSON comes back as its raw text."""
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(path).to_pylist(), start=1):
            yield i, row
    elif path.endswith(".arrow"):
        yield from enumerate(_arrow_rows(path), start=1)
    elif path.endswith(".jsonl"):
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, start=1):
                if line.strip():
                    try:
                        yield i, json.loads(line)
                    except json.JSONDecodeError as e:
                        yield i, f"invalid JSON ({e.msg})"
    else:
        with open(path, encoding="utf-8") as f:
            rows = json.load(f)
        yield from enumerate(rows if isinstance(rows, list) else [rows], start=1)


# ---------------------------------------------------------------------------------------------
# Rows -> examples
# ---------------------------------------------------------------------------------------------


def resize_image(image: Image.Image, min_pixels: int, max_pixels: int) -> Image.Image:
    """RGB, sides multiples of 32, area within [min_pixels, max_pixels] (Qwen's smart resize)."""
    from qwen_vl_utils import smart_resize

    image = image.convert("RGB")
    h, w = smart_resize(image.height, image.width, IMAGE_FACTOR, min_pixels, max_pixels)
    return image if (w, h) == image.size else image.resize((w, h), Image.BICUBIC)


def load_image(value, base_dir: str) -> Image.Image:
    """A PIL image from a path (relative to the data file), bytes, base64, an HF image dict
    (`{"bytes", "path"}`) or a PIL image. Raises ValueError saying what was wrong."""
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict):
        if value.get("bytes"):
            return load_image(value["bytes"], base_dir)
        if value.get("path"):
            return load_image(value["path"], base_dir)
        raise ValueError("image dict has neither bytes nor path")
    if isinstance(value, str):
        path = value if os.path.isabs(value) else os.path.join(base_dir, value)
        if len(value) < 4096 and os.path.exists(path):
            with open(path, "rb") as f:
                value = f.read(MAX_IMAGE_BYTES + 1)
        else:
            payload = value.split(",", 1)[1] if value.startswith("data:") else value
            try:
                value = base64.b64decode(payload, validate=True)
            except (binascii.Error, ValueError):
                raise ValueError(f"not a file and not base64: {value[:60]!r}") from None
    if isinstance(value, (bytes, bytearray)):
        if len(value) > MAX_IMAGE_BYTES:
            raise ValueError(f"image over {MAX_IMAGE_BYTES} bytes")
        try:
            image = Image.open(io.BytesIO(value))
            image.load()
        except Exception as e:
            raise ValueError(f"unreadable image ({type(e).__name__}: {e})") from None
        return image
    raise ValueError(f"unsupported image value of type {type(value).__name__}")


def _first(row: dict, names: tuple[str, ...]):
    for name in names:
        if row.get(name) not in (None, "", []):
            return name, row[name]
    return None, None


def row_to_example(
    row: dict,
    *,
    where: str,
    base_dir: str,
    suffix: str = OCTOPUS_SUFFIX,
    min_pixels: int = 256 * 28 * 28,
    max_pixels: int = 1280 * 28 * 28,
) -> dict:
    """One ViRL-39K / Geometry3K-style row -> example. `<image>` placeholders in the question
    place the images; without them the images come first. Raises DataError naming `where`."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: {row if isinstance(row, str) else 'row is not an object'}")
    q_name, question = _first(row, QUESTION_FIELDS)
    if question is None:
        raise DataError(f"{where}: no question (looked for {', '.join(QUESTION_FIELDS)})")
    _, answer = _first(row, ANSWER_FIELDS)
    if answer is None:
        raise DataError(f"{where}: no answer (looked for {', '.join(ANSWER_FIELDS)})")
    img_name, images = _first(row, IMAGE_FIELDS)
    images = [] if images is None else images if isinstance(images, list) else [images]
    loaded = []
    for k, value in enumerate(images):
        try:
            loaded.append(resize_image(load_image(value, base_dir), min_pixels, max_pixels))
        except ValueError as e:
            raise DataError(f"{where}: field {img_name}[{k}]: {e}") from None
    content: list[dict] = []
    pieces = str(question).split("<image>")
    if len(pieces) - 1 == len(loaded):
        for k, piece in enumerate(pieces):
            if piece.strip():
                content.append({"type": "text", "text": piece.strip()})
            if k < len(loaded):
                content.append({"type": "image", "image": loaded[k]})
    else:
        if len(pieces) > 1:
            raise DataError(f"{where}: field {q_name} has {len(pieces) - 1} <image> tags but "
                            f"{len(loaded)} images")  # fmt: skip
        content = [{"type": "image", "image": im} for im in loaded]
        content.append({"type": "text", "text": str(question).strip()})
    if content[-1]["type"] == "text":
        content[-1] = {"type": "text", "text": content[-1]["text"] + suffix}
    else:
        content.append({"type": "text", "text": suffix.strip()})
    example = {
        "id": str(row.get("id", row.get("qid", where))),
        "messages": [{"role": "user", "content": content}],
        "answer": str(answer).strip(),
    }
    if row.get("category") is not None:
        example["category"] = str(row["category"])
    if row.get("response"):  # a cold-start target (coldstart.py): o1 + SC + o2
        example["response"] = str(row["response"])
    return example


def load_examples(
    path: str,
    *,
    split: str | None = None,
    suffix: str = OCTOPUS_SUFFIX,
    min_pixels: int = 256 * 28 * 28,
    max_pixels: int = 1280 * 28 * 28,
    limit: int | None = None,
) -> tuple[list[dict], LoadReport]:
    """All examples of a JSONL / JSON / parquet file or an HF dataset folder, and the report of
    what was skipped and why (`report.skipped` has one line per bad row)."""
    report = LoadReport()
    examples = []
    for file in _data_files(path, split):
        base_dir = os.path.dirname(os.path.abspath(file))
        for i, row in _file_rows(file):
            if limit is not None and len(examples) >= limit:
                return examples, report
            report.rows += 1
            try:
                examples.append(
                    row_to_example(
                        row,
                        where=f"{file}:row {i}",
                        base_dir=base_dir,
                        suffix=suffix,
                        min_pixels=min_pixels,
                        max_pixels=max_pixels,
                    )  # fmt: skip
                )
                report.kept += 1
            except DataError as e:
                report.skipped.append(str(e))
    return examples, report


def prompt_length(processor, example: dict) -> int:
    """Tokens of `example`'s prompt as the model sees it: the chat template's text plus every
    image's visual tokens, counted with the image processor's own resizing rule (no pixel is
    processed, so filtering a 39k-row dataset at load costs seconds)."""
    messages = example["messages"]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    n = len(processor.tokenizer(text, add_special_tokens=False)["input_ids"])
    vision = processor.image_processor
    for m in messages:
        for item in m["content"] if isinstance(m["content"], list) else []:
            if item.get("type") == "image":  # one <|image_pad|> in the text stands for them all
                image = item["image"]
                patches = vision.get_number_of_image_patches(image.height, image.width, {})
                n += patches // vision.merge_size**2 - 1
    return n


# ---------------------------------------------------------------------------------------------
# The synthetic task of the CPU demo: count black dots (a tiny model learns it on 2 cores)
# ---------------------------------------------------------------------------------------------

DOTS_QUESTION = "How many dots are in the image?"
# The harder variant's question: squares are drawn too, and only the round dots count.
DOTS_QUESTION_SQUARES = "How many round dots are in the image? Do not count the squares."

# Variants of the dot task. "easy" is the demo's: 96x96 (9 visual tokens), 1-6 dots. "hard"
# leaves reinforcement learning room at toy scale (bench/toy_replication.py): 128x128 (16
# visual tokens, the tiny processor's most), 1-9 dots and up to 3 grey squares that must not be
# counted. Every shape has a 32-pixel cell (one visual token) to itself, and the dots stay large
# and black: with radius-6 dots and black squares the ~1M-parameter model stayed at chance
# through 475 SFT steps; with these it learns within ~300 (README, toy-scale replication).
DOTS_VARIANTS: dict[str, dict] = {
    "easy": dict(size=96, cell=32, radius=8, max_dots=6, max_squares=0, question=DOTS_QUESTION),
    "hard": dict(size=128, cell=32, radius=8, max_dots=9, max_squares=3,
                 square_fill=(150, 150, 150), question=DOTS_QUESTION_SQUARES),
}  # fmt: skip


def dots_image(
    count: int,
    rng: random.Random,
    size: int = 96,
    cell: int = 32,
    *,
    radius: int = 8,
    squares: int = 0,
    square_fill: str | tuple[int, int, int] = "black",
) -> Image.Image:
    """`count` black dots of `radius` on white and `squares` squares of the same width in
    `square_fill`, at most one shape per `cell`-pixel cell, each fully inside its cell."""
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    grid = [(x, y) for x in range(size // cell) for y in range(size // cell)]
    if count + squares > len(grid):
        raise ValueError(f"{count} dots + {squares} squares do not fit {len(grid)} cells")
    cells = rng.sample(grid, count)
    # the squares are drawn after the dots (and only when asked): the easy images stay the same
    if squares:
        cells += rng.sample([c for c in grid if c not in cells], squares)
    for k, (cx, cy) in enumerate(cells):
        x = cx * cell + rng.randint(radius + 1, cell - radius - 1)
        y = cy * cell + rng.randint(radius + 1, cell - radius - 1)
        box = (x - radius, y - radius, x + radius, y + radius)
        if k < count:
            draw.ellipse(box, fill="black")
        else:
            draw.rectangle(box, fill=square_fill)
    return image


def synthetic_task(
    n: int,
    seed: int = 0,
    *,
    suffix: str = OCTOPUS_SUFFIX,
    max_dots: int | None = None,
    variant: str = "easy",
) -> list[dict]:
    """`n` dot-counting examples (answers 1..max_dots, by default the variant's), deterministic
    in `seed`; `variant` names an entry of `DOTS_VARIANTS`."""
    if variant not in DOTS_VARIANTS:
        raise ValueError(f"unknown dots variant {variant!r}; known: {', '.join(DOTS_VARIANTS)}")
    v = DOTS_VARIANTS[variant]
    max_dots = v["max_dots"] if max_dots is None else max_dots
    rng = random.Random(seed)
    out = []
    for i in range(n):
        count = rng.randint(1, max_dots)
        squares = rng.randint(0, v["max_squares"]) if v["max_squares"] else 0
        image = dots_image(count, rng, v["size"], v["cell"], radius=v["radius"], squares=squares,
                           square_fill=v.get("square_fill", "black"))  # fmt: skip
        content = [
            {"type": "image", "image": image},
            {"type": "text", "text": v["question"] + suffix},
        ]
        name = "dots" if variant == "easy" else f"dots-{variant}"
        out.append({"id": f"{name}-{seed}-{i}", "messages": [{"role": "user", "content": content}],
                    "answer": str(count)})  # fmt: skip
    return out


def synthetic_answer(answer: str, guess: str | None = None) -> str:
    """A well-formed `<think>...</think> \\boxed{}` part answering `guess` (default: right)."""
    guess = answer if guess is None else guess
    return f"<think>\nI count the dots: {guess}.\n</think>\n\n\\boxed{{{guess}}}"


def synthetic_coldstart(
    example: dict, rng: random.Random, p_wrong_first: float = 0.5, p_wrong_second: float = 0.3
) -> str:
    """A cold-start response `o1 + SC + o2` for a dot example (the cold start of Sec. 4.1 in miniature): o1 a
    near miss with probability `p_wrong_first`, o2 right except with `p_wrong_second`. The
    demo's teacher is noisy on purpose: a cold start that already counts perfectly would leave
    RL nothing to improve."""
    answer = example["answer"]

    def guess(p_wrong: float) -> str:
        if rng.random() >= p_wrong:
            return answer
        if answer == "1":  # a near miss that is still a count
            return "2"
        return str(int(answer) + rng.choice([-1, 1]))

    return (
        synthetic_answer(answer, guess(p_wrong_first))
        + SC
        + synthetic_answer(answer, guess(p_wrong_second))
    )
