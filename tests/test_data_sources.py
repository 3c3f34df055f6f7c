"""Each data source a reproduction fetches (README "Getting the data"), as a fixture shaped like
its real schema, read through the loaders train.py, eval.py and coldstart.py use.

Schemas, read from the sources themselves:
- ViRL-39K, TIGER-Lab/ViRL39K (dataset card; `39Krelease.parquet` + `images.zip`): `question`,
  `answer` (every answer inside `\\boxed{}`), `image` (a list of paths such as
  `images/Processed-....jpg`, relative to the parquet once the zip is unpacked beside it),
  `category`, `source`, `qid`, `PassRate_32BTrained`, `PassRate_7BUntrained`; 38,870 rows.
- ViRL-39K's parquet mirror, Kun-Xiang/ViRL39K (dataset card, `data/train-*`): `answer`,
  `category`, `qid`, `images` (list of HF image structs `{bytes, path}`), `problem`, `id`
  (int64).
- Geometry3K, hiyouga/geometry3k (dataset card, `data/test-*`, 601 rows): `images` (sequence of
  image), `problem` (with an `<image>` tag), `answer`, `id` (int64), `choices` (list of
  string), `ground_truth`.
- LLaVA-CoT-100k, Xkev/LLaVA-CoT-100k (`train.jsonl`, images in `image.zip.part-*`): `{"id",
  "image": path, "conversations": [{"from": "human", "value"}, {"from": "gpt", "value"}]}`,
  the short answer inside `<CONCLUSION> ... </CONCLUSION>`.
- VLMEvalKit TSVs (open-compass/VLMEvalKit, vlmeval/dataset/image_base.py, image_mcq.py,
  image_yorn.py, image_vqa.py, charxiv.py): `index`, `image` (base64; a short cell is the index
  of the row holding the same image; `['b64', ...]` for several), `question`, `answer`,
  options `A`, `B`, ..., `hint`, `category`, `split` (MMMU_DEV_VAL: dev / validation).
"""

import base64
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

import eval as ev
from data import EncodedImage, decode_example, load_examples, prompt_length
from reward import score


def _jpeg(color, size=(320, 240)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _png(color, size=(300, 200)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _images(example) -> list:
    return [c["image"] for c in example["messages"][0]["content"] if c["type"] == "image"]


def _text(example) -> str:
    return "".join(c["text"] for c in example["messages"][0]["content"] if c["type"] == "text")


def _right(answer: str) -> str:
    return f"<think>\nWorked out.\n</think>\n\n\\boxed{{{answer}}}"


IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def test_virl39k_as_released(tmp_path):
    """TIGER-Lab/ViRL39K: the parquet beside the unpacked `images/` folder, loaded as
    `--train_data data/ViRL39K` (the folder); images stay files on disk until a step."""
    root = tmp_path / "ViRL39K"
    (root / "images").mkdir(parents=True)
    (root / "images" / "Processed-a.jpg").write_bytes(_jpeg("red"))
    (root / "images" / "Processed-b.jpg").write_bytes(_jpeg("blue"))
    (root / "images.zip").write_bytes(b"PK")  # the downloaded archive stays beside, unread
    (root / "README.md").write_text("# ViRL39K")
    (root / ".cache" / "huggingface").mkdir(parents=True)  # hf download --local-dir metadata
    (root / ".cache" / "huggingface" / "x.json").write_text("{}")
    table = pa.table({
        "question": ["<image>As shown, find the angle ABC.", "What is the total of the two bars?"],
        "answer": ["\\boxed{17^\\circ}", "\\boxed{\\frac{3}{4}}"],
        "image": [["images/Processed-a.jpg"], ["images/Processed-b.jpg"]],
        "category": ["(GradeSchool) Geometric", "(Chart) Bar"],
        "source": ["MMK12", "LLaVA-OneVision"],
        "qid": ["qid-1", "qid-2"],
        "PassRate_32BTrained": [0.25, 0.5],
        "PassRate_7BUntrained": [None, 0.125],
    })  # fmt: skip
    pq.write_table(table, root / "39Krelease.parquet")
    examples, report = load_examples(str(root))
    assert report.rows == 2 and report.kept == 2 and not report.skipped
    a, b = examples
    assert (a["id"], a["answer"], a["category"]) == (
        "qid-1",
        "\\boxed{17^\\circ}",
        "(GradeSchool) Geometric",
    )
    assert _text(a).startswith("As shown, find the angle ABC.")
    assert [c["type"] for c in b["messages"][0]["content"]] == ["image", "text"]  # no tag: first
    image = _images(a)[0]
    assert isinstance(image, EncodedImage) and image.data == str(
        root / "images" / "Processed-a.jpg"
    )
    assert _images(decode_example(a))[0].getpixel((10, 10))[0] > 240  # red, read in the step
    # the boxed truths grade plain answers right (the card: answers with text inside the box)
    assert score(_right("17"), a["answer"], kind="baseline").acc_final == 1.0
    assert score(_right("0.75"), b["answer"], kind="baseline").acc_final == 1.0
    assert score(_right("18"), a["answer"], kind="baseline").acc_final == 0.0


def test_virl39k_parquet_mirror_with_image_structs(tmp_path, processor):
    """Kun-Xiang/ViRL39K: images embedded as HF image structs; the bytes are kept encoded and
    the prompt length is counted from the header's size, equal to the decoded prompt's."""
    root = tmp_path / "ViRL39K" / "data"
    root.mkdir(parents=True)
    schema = pa.schema([("answer", pa.string()), ("category", pa.string()), ("qid", pa.string()),
                        ("images", pa.list_(IMAGE_STRUCT)), ("problem", pa.string()),
                        ("id", pa.int64())])  # fmt: skip
    rows = [
        {"answer": "\\boxed{B}", "category": "(Chart) Line", "qid": "q7",
         "images": [{"bytes": _jpeg("green", (640, 480)), "path": "x.jpg"}],
         "problem": "<image>Which line is higher?\nA. red\nB. blue", "id": 7},
        {"answer": "\\boxed{5}", "category": "(Spatial) Count", "qid": "q8",
         "images": [{"bytes": _jpeg("white", (1600, 200)), "path": None}],
         "problem": "How many? <image>", "id": 8},
    ]  # fmt: skip
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), root / "train-00000-of-00001.parquet")
    examples, report = load_examples(str(tmp_path / "ViRL39K"))
    assert report.kept == 2 and [e["id"] for e in examples] == ["7", "8"]
    first = _images(examples[0])[0]
    assert isinstance(first, EncodedImage) and first.data == rows[0]["images"][0]["bytes"]
    assert first.size == (640, 480)  # 307,200 px: inside [256, 1280] x 28 x 28, kept
    wide = _images(examples[1])[0]
    assert wide.width % 32 == 0 and wide.height % 32 == 0 and wide.width / wide.height > 6
    for e in examples:
        decoded = decode_example(e)
        assert _images(decoded)[0].size == _images(e)[0].size
        assert prompt_length(processor, e) == prompt_length(processor, decoded)
    assert score(_right("B"), examples[0]["answer"], kind="baseline").acc_final == 1.0


def test_geometry3k_test_split(tmp_path):
    """hiyouga/geometry3k: `--val_data data/geometry3k` holds the test parquet only (the
    README's command fetches `data/test-*`); with the whole repository, `split` picks it."""
    root = tmp_path / "geometry3k" / "data"
    root.mkdir(parents=True)
    schema = pa.schema([("images", pa.list_(IMAGE_STRUCT)), ("problem", pa.string()),
                        ("answer", pa.string()), ("id", pa.int64()),
                        ("choices", pa.list_(pa.string())), ("ground_truth", pa.string())])  # fmt: skip
    for split, answer in (("test", "8.5"), ("train", "3")):
        row = {"images": [{"bytes": _png("white"), "path": None}],
               "problem": "<image>Find x. Round to the nearest tenth.", "answer": answer,
               "id": 1, "choices": ["5.1", "8.5", "9.2", "12.3"], "ground_truth": "B"}  # fmt: skip
        pq.write_table(
            pa.Table.from_pylist([row], schema=schema), root / f"{split}-00000-of-00001.parquet"
        )
    examples, _ = load_examples(str(tmp_path / "geometry3k"), split="test")
    assert len(examples) == 1 and examples[0]["answer"] == "8.5"  # `answer`, not the letter
    assert _text(examples[0]).startswith("Find x. Round to the nearest tenth.")
    assert score(_right("8.5"), examples[0]["answer"], kind="baseline").acc_final == 1.0


def test_llava_cot_rows_become_coldstart_inputs(tmp_path):
    """Xkev/LLaVA-CoT-100k train.jsonl: the question from the human turn, the answer from the
    gpt turn's <CONCLUSION>; the image path relative to the unpacked zip beside the file."""
    root = tmp_path / "llava-cot"
    (root / "sqa" / "train" / "12").mkdir(parents=True)
    (root / "sqa" / "train" / "12" / "image.png").write_bytes(_png("yellow"))
    (root / "coco" / "train2017").mkdir(parents=True)
    (root / "coco" / "train2017" / "0001.jpg").write_bytes(_jpeg("gray"))
    gpt = ("<SUMMARY> I will look at the map. </SUMMARY>\n\n<CAPTION> A map of states. </CAPTION>"
           "\n\n<REASONING> The highlighted state is Ohio. </REASONING>\n\n<CONCLUSION> B "
           "</CONCLUSION>")  # fmt: skip
    rows = [
        {"id": "sqa-12", "image": "sqa/train/12/image.png", "conversations": [
            {"from": "human", "value": "Which state is highlighted?\nA. Iowa\nB. Ohio"},
            {"from": "gpt", "value": gpt}]},
        {"id": "coco-1", "image": "coco/train2017/0001.jpg", "conversations": [
            {"from": "human", "value": "<image>\nHow many cats are there?"},
            {"from": "gpt", "value": "<SUMMARY>s</SUMMARY><CONCLUSION>2</CONCLUSION>"}]},
        {"id": "broken", "image": "coco/train2017/0001.jpg", "conversations": [
            {"from": "human", "value": "No answer turn"}]},
    ]  # fmt: skip
    (root / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    examples, report = load_examples(str(root / "train.jsonl"), suffix="")
    assert report.kept == 2 and len(report.skipped) == 1
    assert "row 3: no answer" in report.skipped[0]
    sqa, coco = examples
    assert (sqa["id"], sqa["answer"], coco["answer"]) == ("sqa-12", "B", "2")
    assert _text(sqa) == "Which state is highlighted?\nA. Iowa\nB. Ohio"
    assert _text(coco) == "How many cats are there?" and len(_images(coco)) == 1
    assert _images(decode_example(sqa))[0].getpixel((1, 1)) == (255, 255, 0)
    # coldstart.py writes a row per kept input that data.py reads back (question_row)
    from coldstart import question_row

    (tmp_path / "images").mkdir()
    out = question_row(decode_example(sqa), str(tmp_path / "images"), "images")
    assert out["question"] == "<image>Which state is highlighted?\nA. Iowa\nB. Ohio"
    assert out["answer"] == "B" and out["images"] == ["images/sqa-12_0.png"]


# --------------------------------------------------------------------------- VLMEvalKit TSVs


def _b64(color, size=(300, 200)) -> str:
    return base64.b64encode(_png(color, size)).decode()


def _tsv(path, header: list[str], rows: list[list[str]]) -> str:
    path.write_text("\t".join(header) + "\n" + "".join("\t".join(r) + "\n" for r in rows))
    return str(path)


def test_vlmevalkit_mcq_with_shared_images_and_a_broken_row(tmp_path):
    """MMStar / HallusionBench style: an image stored once and referenced by index, VLMEvalKit's
    multiple-choice prompt, Yes/No truths; an undecodable image is skipped and named."""
    head = ["index", "question", "answer", "A", "B", "C", "D", "category", "l2-category", "image"]
    path = _tsv(tmp_path / "MMStar.tsv", head, [
        ["0", "Which colour dominates?", "A", "red", "blue", "green", "grey", "coarse perception",
         "image scene and topic", _b64("red")],
        ["1", "Is it warm?", "B", "no", "yes", "", "", "instance reasoning", "single-instance", "0"],
    ])  # fmt: skip
    ex = ev.load_vlmevalkit_tsv(path, suffix="")
    assert [e["answer"] for e in ex] == ["A", "B"]
    assert _text(ex[0]) == ("Question: Which colour dominates?\nOptions:\nA. red\nB. blue\n"
                            "C. green\nD. grey\nPlease select the correct answer from the options above.")  # fmt: skip
    assert "C." not in _text(ex[1])
    # row 1's image cell names row 0: the same image
    assert _images(ex[1])[0].data == _images(ex[0])[0].data
    yorn = _tsv(tmp_path / "HallusionBench.tsv", ["index", "image", "question", "answer", "category"], [
        ["7", _b64("blue"), "Is the sky blue in this picture?", "Yes", "VS"],
        ["8", base64.b64encode(_png("blue")[: len(_png("blue")) // 2]).decode(), "Is it red?", "No", "VS"],
    ])  # fmt: skip
    examples = ev.load_eval_data(yorn)
    assert [e["answer"] for e in examples] == ["Yes", "No"]  # the cut PNG's header still reads

    class Echo:  # answers every prompt with "Yes"
        max_model_len = 10_000

        def generate(self, prompts, n, sampling, prefixes=None):
            from rollout import Rollout

            return [[Rollout([1], [0.0], _right("Yes"), "stop")] * n for _ in prompts]

    skipped: list[str] = []
    records = ev.run(Echo(), _FakeProcessor(), examples, n=1, sampling=None, direct=False,
                     sc_rounds=0, skipped=skipped)  # fmt: skip
    assert [r["id"] for r in records] == ["7"] and records[0]["rounds"][-1]["correct"]
    assert len(skipped) == 1 and skipped[0].startswith("8: ") and "field image[0]" in skipped[0]


class _FakeProcessor:
    """Renders a chat as its texts (enough for eval.run without the engine's tokenizer)."""

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return _text({"messages": messages})


def test_vlmevalkit_mmmu_images_list_and_validation_split(tmp_path):
    """MMMU_DEV_VAL: several images per row as a list literal, dev and validation rows; the
    Table 2 column keeps the validation rows."""
    head = ["index", "question", "A", "B", "answer", "category", "image", "split"]
    two = str([_b64("red"), _b64("green")])
    path = _tsv(tmp_path / "MMMU_DEV_VAL.tsv", head, [
        ["1", "<image 1> or <image 2>: which is red?", "first", "second", "A", "Art", two, "dev"],
        ["2", "<image 1> or <image 2>: which is green?", "first", "second", "B", "Art", two, "validation"],
        ["3", "Broken list", "x", "y", "A", "Art", "['abc", "validation"],
    ])  # fmt: skip
    report = ev.LoadReport()
    ex = ev.load_vlmevalkit_tsv(path, split="validation", report=report)
    assert [e["id"] for e in ex] == ["2"] and report.rows == 2
    assert len(report.skipped) == 1 and "row 4: field image" in report.skipped[0]
    decoded = _images(decode_example(ex[0]))
    assert [im.getpixel((3, 3)) for im in decoded] == [(255, 0, 0), (0, 128, 0)]
    assert len(ev.load_vlmevalkit_tsv(path, report=ev.LoadReport())) == 2  # no split: every row
