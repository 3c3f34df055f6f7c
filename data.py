"""Dataset rows -> chat examples with images (the paper trains on ViRL-39K and validates on
Geometry3K; the cold start reads LLaVA-CoT-100k), and the synthetic visual task of the CPU demo.

An example is a plain dict: `{"id", "messages", "answer", "category"?}` where `messages` is a
chat whose user turn holds `{"type": "image", "image": ...}` and `{"type": "text"}` items. A
loaded example keeps each image *encoded* (`EncodedImage`: the file's bytes or its path, and
the size the model will see, read from the header): ViRL-39K holds 2.9 GB of JPEGs, ~55 GiB
once decoded, on every rank. `decode_example` turns them into resized PIL images when a step
renders its prompts (train.py, eval.py, coldstart.py); the synthetic task's images are PIL
from the start and pass through. A bad row (no answer, unreadable image) is reported with its
file, row number and field, counted, and never silently dropped; an image whose header reads
but whose pixels do not is found when the step decodes it, and skipped and counted there.
"""

from __future__ import annotations

import base64
import binascii
import functools
import glob
import io
import json
import os
import random
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from PIL import Image, ImageDraw

from config import MAX_PIXELS, MIN_PIXELS, Config
from octopus import BASELINE_SUFFIX, OCTOPUS_SUFFIX, SC

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
# Rows -> examples
# ---------------------------------------------------------------------------------------------

# LLaVA-CoT-100k's responses end with the short answer inside <CONCLUSION> ... </CONCLUSION>
# (Xkev/LLaVA-CoT-100k, train.jsonl); the cold start needs that answer as the ground truth.
_CONCLUSION_RE = re.compile(r"<CONCLUSION>(.*?)</CONCLUSION>", re.DOTALL)


def _first(row: dict, names: tuple[str, ...]):
    for name in names:
        if row.get(name) not in (None, "", []):
            return name, row[name]
    return None, None


def conversation_fields(turns) -> tuple[str | None, str | None]:
    """(question, answer) of a LLaVA-style `conversations` list (`{"from": "human" | "gpt",
    "value"}`): the first human turn and the first assistant turn after it, the answer cut to
    its `<CONCLUSION>` when it has one (LLaVA-CoT-100k). Later turns are not used."""
    if not isinstance(turns, list):
        return None, None
    question = answer = None
    for turn in turns:
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            continue
        who = str(turn.get("from", turn.get("role", ""))).lower()
        if question is None and who in ("human", "user"):
            question = turn["value"]
        elif question is not None and who in ("gpt", "assistant"):
            found = _CONCLUSION_RE.search(turn["value"])
            answer = (found.group(1) if found else turn["value"]).strip()
            break
    return question, answer or None


def _encoded_images(
    row: dict, where: str, base_dir: str, min_pixels: int, max_pixels: int
) -> list[EncodedImage]:
    img_name, images = _first(row, IMAGE_FIELDS)
    images = [] if images is None else images if isinstance(images, list) else [images]
    loaded = []
    for k, value in enumerate(images):
        field_at = f"{where}: field {img_name}[{k}]"
        try:
            loaded.append(encode_image(value, base_dir, min_pixels, max_pixels, field_at))
        except ValueError as e:
            raise DataError(f"{field_at}: {e}") from None
    return loaded


def row_to_example(
    row: dict,
    *,
    where: str,
    base_dir: str,
    suffix: str = OCTOPUS_SUFFIX,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
) -> dict:
    """One ViRL-39K / Geometry3K / LLaVA-CoT-style row -> example (images kept encoded).
    `<image>` placeholders in the question place the images; without them the images come
    first. Raises DataError naming `where`."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: {row if isinstance(row, str) else 'row is not an object'}")
    q_name, question = _first(row, QUESTION_FIELDS)
    _, answer = _first(row, ANSWER_FIELDS)
    if question is None and row.get("conversations") is not None:
        q_name = "conversations"
        question, answer = conversation_fields(row["conversations"])
    if question is None:
        raise DataError(f"{where}: no question (looked for {', '.join(QUESTION_FIELDS)}, "
                        "conversations)")  # fmt: skip
    if answer is None:
        raise DataError(f"{where}: no answer (looked for {', '.join(ANSWER_FIELDS)}, "
                        "a gpt turn of conversations)")  # fmt: skip
    loaded = _encoded_images(row, where, base_dir, min_pixels, max_pixels)
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
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
    limit: int | None = None,
) -> tuple[list[dict], LoadReport]:
    """All examples of a JSONL / JSON / parquet file or an HF dataset folder (images encoded:
    `decode_example` gives the pixels), and the report of what was skipped and why
    (`report.skipped` has one line per bad row)."""
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
    image's visual tokens, counted with the image processor's own resizing rule from the image's
    size (encoded or decoded alike: no pixel is processed, so filtering a 39k-row dataset at
    load costs seconds)."""
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
# Images: kept encoded at load, decoded in the step
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EncodedImage:
    """One image as its file holds it: `data` is the encoded bytes or the absolute path of the
    file; `width` x `height` is the size the model sees (Qwen's smart resize of the size in the
    header, decided at load so the prompt-length filter needs no pixels); `where` names the row
    and field for the message of a decode that fails."""

    data: bytes | str = field(repr=False)
    width: int
    height: int
    where: str = ""

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height

    def decode(self) -> Image.Image:
        """The RGB pixels at `size`. Raises ValueError saying what was wrong."""
        image = _open(self.data, load=True).convert("RGB")
        return image if image.size == self.size else image.resize(self.size, Image.BICUBIC)


def resize_image(image: Image.Image, min_pixels: int, max_pixels: int) -> Image.Image:
    """RGB, sides multiples of 32, area within [min_pixels, max_pixels] (Qwen's smart resize)."""
    image = image.convert("RGB")
    w, h = target_size(image.width, image.height, min_pixels, max_pixels)
    return image if (w, h) == image.size else image.resize((w, h), Image.BICUBIC)


def target_size(width: int, height: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(width, height) after Qwen's smart resize: sides multiples of 32, area in range. Raises
    ValueError for an aspect ratio over 200 (qwen_vl_utils refuses those)."""
    from qwen_vl_utils import smart_resize

    h, w = smart_resize(height, width, IMAGE_FACTOR, min_pixels, max_pixels)
    return w, h


def _open(data: bytes | str, *, load: bool) -> Image.Image:
    """PIL's lazy open of an encoded image (the header only), or with `load` its pixels too."""
    try:
        image = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
        if load:
            image.load()
    except Exception as e:
        raise ValueError(f"unreadable image ({type(e).__name__}: {e})") from None
    return image


def image_source(value, base_dir: str) -> bytes | str:
    """The encoded file behind an image value: bytes (from bytes, base64, a data URI or an HF
    image struct `{"bytes", "path"}`) or the absolute path of a file (a path relative to the
    data file). Raises ValueError saying what was wrong."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return image_source(value["bytes"], base_dir)
        if value.get("path"):
            return image_source(value["path"], base_dir)
        raise ValueError("image dict has neither bytes nor path")
    if isinstance(value, str):
        path = value if os.path.isabs(value) else os.path.join(base_dir, value)
        if len(value) < 4096 and os.path.isfile(path):
            if os.path.getsize(path) > MAX_IMAGE_BYTES:
                raise ValueError(f"image over {MAX_IMAGE_BYTES} bytes: {path}")
            return os.path.abspath(path)
        payload = value.split(",", 1)[1] if value.startswith("data:") else value
        try:
            value = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            where = f" (no file {path})" if len(value) < 4096 else ""
            raise ValueError(f"not a file and not base64: {value[:60]!r}{where}") from None
    if isinstance(value, (bytes, bytearray)):
        if len(value) > MAX_IMAGE_BYTES:
            raise ValueError(f"image over {MAX_IMAGE_BYTES} bytes")
        return bytes(value)
    raise ValueError(f"unsupported image value of type {type(value).__name__}")


def encode_image(
    value, base_dir: str, min_pixels: int, max_pixels: int, where: str = ""
) -> EncodedImage | Image.Image:
    """An image value of a row -> `EncodedImage` (its header read, its pixels not). A PIL image
    (already decoded) is resized and kept. Raises ValueError saying what was wrong."""
    if isinstance(value, Image.Image):
        return resize_image(value, min_pixels, max_pixels)
    data = image_source(value, base_dir)
    with _open(data, load=False) as image:
        width, height = image.size
    return EncodedImage(data, *target_size(width, height, min_pixels, max_pixels), where)


def decode_example(example: dict) -> dict:
    """`example` with every `EncodedImage` of its chat decoded into a resized RGB PIL image
    (what the processor and the engine take); PIL images pass through. Raises DataError naming
    the row and field of an image that does not decode."""
    messages = []
    for m in example["messages"]:
        content = m["content"]
        if isinstance(content, list):
            content = [_decoded(item) for item in content]
        messages.append({**m, "content": content})
    return {**example, "messages": messages}


def _decoded(item: dict) -> dict:
    image = item.get("image") if item.get("type") == "image" else None
    if not isinstance(image, EncodedImage):
        return item
    try:
        return {**item, "image": image.decode()}
    except ValueError as e:
        raise DataError(f"{image.where}: {e}") from None


def decode_examples(examples: list[dict]) -> tuple[list[dict], list[str]]:
    """The examples whose images decode (in order, decoded) and one line per example that does
    not (its row, field and error): the step goes on without it."""
    kept, bad = [], []
    for e in examples:
        try:
            kept.append(decode_example(e))
        except DataError as err:
            bad.append(f"{e['id']}: {err}")
    return kept, bad


# ---------------------------------------------------------------------------------------------
# Reading rows: JSONL / JSON, parquet, HF dataset folders (save_to_disk arrow or hub parquet)
# ---------------------------------------------------------------------------------------------

# Rows converted to Python objects at a time: a parquet file is read batch by batch, so loading
# holds one batch of Arrow data beside the kept examples, not the whole table twice. Without
# pre-buffering (pyarrow caches whole column chunks by default) the resident memory grows by
# ~1.07x the image bytes per row instead of ~1.9x (bench/data_scale.py).
ROWS_PER_BATCH = 64


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
    # hub downloads keep a cache of metadata under .cache/ (hf download --local-dir)
    files = [f for f in files if ".cache" not in os.path.relpath(f, path).split(os.sep)]
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

        reader = pq.ParquetFile(path, pre_buffer=False, buffer_size=1 << 20)
        rows = (r for b in reader.iter_batches(ROWS_PER_BATCH) for r in b.to_pylist())
        yield from enumerate(rows, start=1)
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
# The synthetic task of the CPU demo: count black dots (a tiny model learns it on 2 cores)
# ---------------------------------------------------------------------------------------------

DOTS_QUESTION = "How many dots are in the image?"
# The harder variant's question: squares are drawn too, and only the round dots count.
DOTS_QUESTION_SQUARES = "How many round dots are in the image? Do not count the squares."

# Variants of the dot task. "easy" is the demo's: 96x96 (9 visual tokens), 1-6 dots. "hard"
# leaves reinforcement learning room at toy scale (bench/toy_replication.py): 128x128 (16
# visual tokens, the tiny processor's most), 1-9 dots and up to 3 grey squares that must not be
# counted. Every shape has a 32-pixel cell (one visual token) to itself, and the dots stay large
# and black, the squares grey: smaller dots or black squares keep the ~1M-parameter model at
# chance for hundreds of SFT steps.
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


# =============================================================================================
# A training run's splits and the order it reads them in (train.py)
# =============================================================================================


def synthetic_size(spec: str) -> int | None:
    """N of a data spec "synthetic:N" (the demo's dot counting), None for a path."""
    if not spec.startswith("synthetic:"):
        return None
    try:
        return int(spec.split(":", 1)[1])
    except ValueError:
        raise DataError(f"{spec!r}: expected synthetic:N with N a whole number") from None


def max_images_of(examples: Iterable[dict]) -> int:
    """The most images any example's chat holds, at least 1: the engine's per-prompt image
    limit (vLLM refuses a prompt with more images than `limit_mm_per_prompt` allows). One rule
    for every reader (rollout's engine, data's multi-stage sizing, coldstart)."""
    counts = [
        sum(item.get("type") == "image" for m in e["messages"] if isinstance(m["content"], list)
            for item in m["content"])
        for e in examples
    ]  # fmt: skip
    return max([1, *counts])


def images_per_prompt(stages: list[Config]) -> int:
    """The most images one prompt holds across the data every stage of a launch reads (at least
    1). The stages of a sequence share one engine, whose per-prompt image limit vLLM fixes when
    it starts: sized for the first stage alone (the cold start's chats), a later stage's
    multi-image ViRL-39K prompt would be refused mid-run. Reads each file once more (~3 ms a row)."""
    specs = []
    for cfg in stages:
        specs.append(cfg.sft_data if cfg.stage == "sft" else cfg.train_data)
        if cfg.val_data and cfg.val_every:
            specs.append(cfg.val_data)
    files = [s for s in dict.fromkeys(specs) if s and synthetic_size(s) is None]
    return max([1, *(max_images_of(load_examples(spec)[0]) for spec in files)])  # dots: 1


def load_split(
    spec: str, cfg: Config, processor, *, seed: int, sft: bool = False, log: Callable = print
) -> tuple[list[dict], int]:
    """Examples of `spec` ("synthetic:N" for the demo's dot counting, else a path for
    `load_examples`) and how many rows were skipped: bad rows (each reported), prompts over
    `max_prompt_len` tokens (images counted), SFT rows without a response. `log`: where the
    one-line reports go (train.py: rank 0 only)."""
    suffix = OCTOPUS_SUFFIX if cfg.prompt_suffix == "octopus" else BASELINE_SUFFIX
    skipped = 0
    if (n := synthetic_size(spec)) is not None:
        examples = synthetic_task(n, seed=seed, suffix=suffix)
        if sft:
            rng = random.Random(seed)
            for e in examples:
                e["response"] = synthetic_coldstart(e, rng)
    else:
        examples, report = load_examples(
            spec, suffix=suffix, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels
        )
        skipped += len(report.skipped)
        if report.skipped:
            log(f"[data] {spec}: {report.summary()}")
    if sft:
        missing = [e["id"] for e in examples if not e.get("response")]
        if missing:
            log(
                f"[data] {spec}: {len(missing)} rows without a 'response' skipped (e.g. {missing[:3]})"
            )
        examples = [e for e in examples if e.get("response")]
        skipped += len(missing)
    long = [e["id"] for e in examples if prompt_length(processor, e) > cfg.max_prompt_len]
    if long:  # the released code filters these at load too; they would not fit the engine
        log(
            f"[data] {spec}: {len(long)} prompts over --max_prompt_len {cfg.max_prompt_len} "
            f"tokens skipped (e.g. {long[:3]})"
        )
        long_ids = set(long)
        examples = [e for e in examples if e["id"] not in long_ids]
        skipped += len(long)
    return examples, skipped


def load_stage_data(cfg: Config, processor, log: Callable = print) -> tuple[list, list, int]:
    """A stage's training examples (the cold start's chats or the RL prompts), its validation
    prompts (none with --val_every 0: val_data is not read) and the training rows skipped;
    stops the launch when no training row is usable."""
    sft = cfg.stage == "sft"
    spec = cfg.sft_data if sft else cfg.train_data
    train, skipped = load_split(spec, cfg, processor, seed=cfg.seed, sft=sft, log=log)
    val = []
    if cfg.val_data and cfg.val_every:
        val = load_split(cfg.val_data, cfg, processor, seed=cfg.seed + 1, log=log)[0]
    if not train:
        raise SystemExit(f"[{cfg.stage}] {spec}: no usable training rows ({skipped} skipped)")
    return train, val, skipped


def share_of_step(
    examples: list[dict], step: int, per_step: int, seed: int, rank: int, world: int
) -> list[dict]:
    """Rank `rank`'s examples of global step `step` (each rank a contiguous slice)."""
    per_rank = per_step // world
    idx = prompts_of_step(len(examples), step, per_step, seed)
    return [examples[i] for i in idx[rank * per_rank : (rank + 1) * per_rank]]


def examples_of_step(
    examples: list[dict],
    step: int,
    per_step: int,
    seed: int,
    rank: int,
    world: int,
    need: int,
    where: str,
) -> tuple[list[dict], list[str]]:
    """Rank `rank`'s examples of `step` with their images decoded, and one line per example left
    out because an image did not decode (reported under `where`; the step goes on with the
    rest). With fewer than `need` left (train.py: one per mini-batch, to stay in step with the
    other ranks' collectives) it stops the launch (torchrun ends every rank) naming the images."""
    mine, bad = decode_examples(share_of_step(examples, step, per_step, seed, rank, world))
    report_bad(where, rank, bad)
    if len(mine) < need:
        raise SystemExit(
            f"[data] rank {rank} step {step + 1}: {len(mine)} of {len(mine) + len(bad)} "
            f"prompts have images that decode, {need} needed: {bad[:3]}"
        )
    return mine, bad


def prompts_of_step(n_examples: int, step: int, per_step: int, seed: int) -> list[int]:
    """Example indices of global step `step`: epochs are seeded permutations read in order, so
    a resumed run continues exactly where it stopped and never repeats a prompt of an epoch."""
    out, pos, end = [], step * per_step, (step + 1) * per_step
    while pos < end:  # a step may run over the end of an epoch into the next
        epoch, k = divmod(pos, n_examples)
        take = min(end - pos, n_examples - k)
        out += epoch_order(n_examples, seed, epoch)[k : k + take]
        pos += take
    return out


@functools.lru_cache(maxsize=4)
def epoch_order(n_examples: int, seed: int, epoch: int) -> tuple[int, ...]:
    """The order of epoch `epoch`: one seeded permutation, drawn once and kept (a step reads
    512 of ViRL-39K's 38,870; drawing it per prompt took seconds per step)."""
    perm = list(range(n_examples))
    random.Random(seed * 1_000_003 + epoch).shuffle(perm)
    return tuple(perm)


def report_bad(where: str, rank: int, bad: list[str]) -> None:
    """One line per rank naming the examples left out for an image that did not decode."""
    if bad:
        print(
            f"{where} rank {rank}: {len(bad)} prompts left out, an image does not decode: "
            f"{'; '.join(bad[:3])}",
            file=sys.stderr,
            flush=True,
        )


def missing_data(stages: list[Config]) -> list[str]:
    """`--flag path` for each data path the stages read that does not exist (the cold start reads
    sft_data, RL stages train_data; val_data when set and --val_every is not 0); "synthetic:N"
    needs no file."""
    missing = []
    for cfg in stages:
        needed = ["sft_data" if cfg.stage == "sft" else "train_data"]
        for flag in needed + (["val_data"] if cfg.val_data and cfg.val_every else []):
            path = getattr(cfg, flag)
            if synthetic_size(path) is not None or (path and os.path.exists(path)):
                continue
            entry = f"--{flag} {path}" if path else f"--{flag} (empty)"
            if entry not in missing:
                missing.append(entry)
    order = ("--sft_data", "--train_data", "--val_data")
    return sorted(missing, key=lambda e: order.index(e.split()[0]))


def missing_data_message(missing: list[str]) -> str:
    """The one message a launch stops with when `missing_data` found something."""
    return (
        f'[data] not found: {", ".join(missing)}. The README section "Getting the data" has '
        "the commands that fetch ViRL-39K, Geometry3K and LLaVA-CoT and build the cold-start "
        "chats into these paths; or point the flags elsewhere."
    )
