"""Datasets, prompts and Qwen2.5-VL processing on the real committed Geometry3K/MATH files and real processor."""

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from mm_gmpo.data import (
    REPO_GEOMETRY3K,
    DataError,
    Prompt,
    geometry3k_prompts,
    load_geometry3k,
    load_text_math,
    text_math_prompts,
)
from mm_gmpo.data.processing import encode_prompt, encode_prompts, load_processor
from mm_gmpo.rewards import score

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"min_pixels": 3136, "max_pixels": 1_003_520}  # the processor's own minimum: native diagram size

IM_START, IM_END, NL, SYSTEM, USER, ASSISTANT = 151644, 151645, 198, 8948, 872, 77091
VISION_START, IMAGE_PAD, VISION_END = 151652, 151655, 151653
DEFAULT_SYSTEM = [2610, 525, 264, 10950, 17847, 13]  # "You are a helpful assistant."


@pytest.fixture(scope="module")
def processor():
    return load_processor()


@pytest.fixture(scope="module")
def geo_test():
    return load_geometry3k(split="test")


def test_split_counts():
    assert len(load_geometry3k(split="test")) == 601
    assert len(load_geometry3k(split="val")) == 300
    assert len(load_geometry3k(split="validation")) == 300  # HF name for the same split


def test_prompt_fields_and_choice_letters(geo_test):
    row = geo_test[0]
    assert row["id"] == "2401" and row["answer_letter"] == "B" and row["answer"] == "60"
    (shown,) = geometry3k_prompts(geo_test.select([0]), show_choices=True)
    text = shown.messages[0]["content"][1]["text"]
    assert "Choices: A. 30  B. 60  C. 120  D. 240" in text
    assert shown.ground_truth == "B" and shown.choices == ["30", "60", "120", "240"]
    assert shown.choice_values == [30.0, 60.0, 120.0, 240.0]
    assert shown.metadata["problem_type_graph"] == ["Triangle"] and shown.metadata["problem_type_goal"] == ["Area"]
    assert shown.messages[0]["content"][0] == {"type": "image"} and shown.images[0].size == (260, 275)
    (hidden,) = geometry3k_prompts(geo_test.select([0]))
    assert "Choices" not in hidden.messages[0]["content"][1]["text"]
    assert hidden.ground_truth == "60" and hidden.choices is None
    assert "<think> </think>" in hidden.messages[0]["content"][1]["text"]
    # the reward accepts what each prompt asks for
    assert score("\\boxed{B}", shown.ground_truth, task="geometry3k", choices=shown.choices)["accuracy"] == 1
    assert score("\\boxed{60}", hidden.ground_truth, task="geometry3k")["accuracy"] == 1


def test_golden_token_ids_and_image_tokens(processor, geo_test):
    (p,) = geometry3k_prompts(geo_test.select([0]))
    enc = encode_prompt(p, processor, **SMALL)
    ids = enc.input_ids
    # <|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>
    golden = [IM_START, SYSTEM, NL, *DEFAULT_SYSTEM, IM_END, NL, IM_START, USER, NL, VISION_START]
    assert ids[: len(golden)] == golden
    # the 260x275 diagram -> 280x252 px -> grid (1, 20, 18) -> 20*18/4 = 90 merged tokens
    assert enc.image_grid_thw.tolist() == [[1, 20, 18]]
    assert ids[len(golden) : len(golden) + 90] == [IMAGE_PAD] * 90
    assert ids[len(golden) + 90] == VISION_END
    assert ids.count(IMAGE_PAD) == enc.n_image_tokens == 90
    assert ids[-5:] == [IM_END, NL, IM_START, ASSISTANT, NL]
    assert enc.pixel_values.shape == (20 * 18, 3 * 2 * 14 * 14)
    tail = processor.tokenizer.decode(ids[len(golden) + 91 : -5])
    assert tail == p.messages[0]["content"][1]["text"]


def test_easyr1_pixel_defaults_upscale_diagrams(processor, geo_test):
    (p,) = geometry3k_prompts(geo_test.select([0]))
    enc = encode_prompt(p, processor)  # min_pixels 512*512
    assert enc.images[0].size == (504, 532)
    assert enc.image_grid_thw.tolist() == [[1, 38, 36]]
    assert enc.input_ids.count(IMAGE_PAD) == 38 * 36 // 4


def test_image_tokens_match_grid_for_many_problems(processor, geo_test):
    for p in geometry3k_prompts(geo_test.select(range(0, 601, 25))):
        enc = encode_prompt(p, processor, **SMALL)
        assert enc.input_ids.count(IMAGE_PAD) == int(enc.image_grid_thw.prod()) // 4
        w, h = enc.images[0].size
        assert w % 28 == 0 and h % 28 == 0


def test_placeholder_and_special_token_errors(processor, geo_test):
    (p,) = geometry3k_prompts(geo_test.select([0]))
    two = Prompt(p.id, p.task, [{"role": "user", "content": [{"type": "image"}, *p.messages[0]["content"]]}],
                 p.images, p.ground_truth)
    with pytest.raises(DataError, match="2 image placeholders but 1 images"):
        encode_prompt(two, processor, **SMALL)
    bad_text = Prompt(p.id, p.task, [{"role": "user", "content": [{"type": "image"},
                      {"type": "text", "text": "look <|image_pad|> here"}]}], p.images, p.ground_truth)
    with pytest.raises(DataError, match=r"special token <\|image_pad\|>"):
        encode_prompt(bad_text, processor, **SMALL)


def test_overlong_prompts_filtered_and_counted(processor, geo_test, caplog):
    prompts = list(geometry3k_prompts(geo_test.select(range(4))))
    lengths = [len(encode_prompt(p, processor, **SMALL).input_ids) for p in prompts]
    limit = sorted(lengths)[1]
    kept, m = encode_prompts(prompts, processor, max_prompt_length=limit, **SMALL)
    assert len(kept) == sum(n <= limit for n in lengths)
    assert m["data/dropped_overlong"] == sum(n > limit for n in lengths) > 0
    assert "dropped" in caplog.text


def test_text_math_prompts_and_tokens(processor):
    ds = load_text_math("math500", levels=[3, 4, 5])
    assert len(ds) == 367 and set(ds["level"]) == {3, 4, 5}
    assert len(load_text_math("math500")) == 500 and len(load_text_math("gsm8k")) == 1319
    assert len(load_text_math("aime2024")) == 30 and len(load_text_math("aime2025")) == 30
    p = next(text_math_prompts(ds))
    assert p.messages[0]["content"].startswith("Please reason step by step") and p.images == []
    enc = encode_prompt(p, processor)
    assert enc.pixel_values is None and IMAGE_PAD not in enc.input_ids
    assert enc.input_ids[:3] == [IM_START, SYSTEM, NL]
    assert score(f"\\boxed{{{p.ground_truth}}}", p.ground_truth, task="math")["accuracy"] == 1


# ---------------------------------------------------------------- error paths


def _copy_split(tmp_path: Path, ids=("2401", "2402", "2403")) -> Path:
    root = tmp_path / "g3k"
    for i in ids:
        shutil.copytree(REPO_GEOMETRY3K / "test" / i, root / "test" / i)
    return root


def test_missing_image_names_file(tmp_path):
    root = _copy_split(tmp_path)
    (root / "test" / "2402" / "img_diagram.png").unlink()
    with pytest.raises(DataError, match=r"2402/img_diagram.png: image file missing"):
        load_geometry3k(root, "test")
    with pytest.warns(UserWarning, match="skipped 1 bad sample"):
        ds = load_geometry3k(root, "test", on_bad_sample="skip")
    assert ds["id"] == ["2401", "2403"]


def test_corrupt_image_and_missing_field(tmp_path):
    root = _copy_split(tmp_path)
    (root / "test" / "2401" / "img_diagram.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match=r"2401/img_diagram.png: the image \(field 'img_diagram.png'\) is not a readable image"):
        load_geometry3k(root, "test")
    meta_path = root / "test" / "2403" / "data.json"
    meta = json.loads(meta_path.read_text())
    del meta["choices"]
    meta_path.write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match="skipped 2 bad sample"):
        ds = load_geometry3k(root, "test", on_bad_sample="skip")
    assert ds["id"] == ["2402"]
    shutil.copy(REPO_GEOMETRY3K / "test" / "2401" / "img_diagram.png", root / "test" / "2401" / "img_diagram.png")
    with pytest.raises(DataError, match=r"2403/data.json: field 'choices' is missing"):
        load_geometry3k(root, "test")


def test_bad_answer_letter_and_empty_split(tmp_path):
    root = _copy_split(tmp_path, ids=("2401",))
    meta_path = root / "test" / "2401" / "data.json"
    meta = json.loads(meta_path.read_text())
    meta["answer"] = "F"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(DataError, match="field 'answer' is 'F'"):
        load_geometry3k(root, "test")
    (root / "val").mkdir()
    with pytest.raises(DataError, match="split is empty"):
        load_geometry3k(root, "val", layout="intergps")
    with pytest.raises(DataError, match="no usable samples"), pytest.warns(UserWarning):
        load_geometry3k(root, "test", on_bad_sample="skip")


def test_text_math_errors(tmp_path):
    f = tmp_path / "m.jsonl"
    f.write_text(json.dumps({"question": "1+1?", "answer": "2"}) + "\n" + json.dumps({"question": "", "answer": "3"}))
    with pytest.raises(DataError, match=r"m.jsonl row 1: field 'question' is empty"):
        load_text_math(f)
    with pytest.warns(UserWarning, match="skipped 1"):
        assert len(load_text_math(f, on_bad_sample="skip")) == 1
    g = tmp_path / "n.jsonl"
    g.write_text(json.dumps({"problem": "1+1?"}) + "\n")
    with pytest.raises(DataError, match="no 'answer' or 'solution' field"):
        load_text_math(g)
    with pytest.raises(DataError, match="file not found"):
        load_text_math(tmp_path / "missing.jsonl")


# ---------------------------------------------------------------- HF layout and the parquet converter


def _png_bytes(path: Path) -> bytes:
    return path.read_bytes()


def test_hf_layout_parquet(tmp_path):
    import datasets

    img = _png_bytes(REPO_GEOMETRY3K / "test" / "2401" / "img_diagram.png")
    ds = datasets.Dataset.from_dict(
        {"images": [[{"bytes": img, "path": None}], [{"bytes": img, "path": None}]],
         "problem": ["<image>Find the area of the figure.", "<image>Find x."], "answer": ["60", "2 \\sqrt { 221 }"]},
        features=datasets.Features(images=datasets.List(datasets.Image()), problem=datasets.Value("string"),
                                   answer=datasets.Value("string")),
    )
    (tmp_path / "hf" / "data").mkdir(parents=True)
    ds.to_parquet(str(tmp_path / "hf" / "data" / "test-00000-of-00001.parquet"))
    loaded = load_geometry3k(tmp_path / "hf", "test")
    assert len(loaded) == 2 and loaded["answer"] == ["60", "2 \\sqrt { 221 }"]
    p = list(geometry3k_prompts(loaded))
    assert p[0].messages[0]["content"][1]["text"].startswith("Find the area of the figure. You FIRST")
    assert p[1].ground_truth == "2 \\sqrt { 221 }" and p[1].images[0].size == (260, 275)
    # a row whose image is not an image
    bad = datasets.Dataset.from_dict({"images": [[{"bytes": b"junk", "path": None}]], "problem": ["x"], "answer": ["1"]},
                                     features=ds.features)
    bad.to_parquet(str(tmp_path / "bad.parquet"))
    with pytest.raises(DataError, match="row 0: field 'images' is not a readable image"):
        load_geometry3k(tmp_path / "bad.parquet", "test")
    # the same folder through data.dataset=files (EasyR1's format, no conversion) gives the same prompts
    from mm_gmpo.data.files import load_file_prompts

    f = load_file_prompts(f"{tmp_path / 'hf'}@test", template="think_boxed", task="geometry3k")
    assert [x.messages for x in f] == [x.messages for x in p] and [x.ground_truth for x in f] == ["60", p[1].ground_truth]
    assert all(a.images[0].tobytes() == b.images[0].tobytes() for a, b in zip(f, p, strict=True))
    # several images in a row: this loader keeps one diagram per problem and says where to go instead
    two = datasets.Dataset.from_dict({"images": [[{"bytes": img, "path": None}] * 2], "problem": ["x"],
                                      "answer": ["1"]}, features=ds.features)
    two.to_parquet(str(tmp_path / "two.parquet"))
    with pytest.raises(DataError, match=r"row 0: field 'images' holds 2 images.*data\.dataset=files"):
        load_geometry3k(tmp_path / "two.parquet", "test")


@pytest.mark.slow
def test_prepare_script_roundtrip(tmp_path):
    out = tmp_path / "val.parquet"
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "prepare_geometry3k.py"), "--split", "val", "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "wrote 300 problems" in r.stdout
    back = load_geometry3k(out, "val")
    assert len(back) == 300
    original = load_geometry3k(split="val")
    assert back["id"] == original["id"] and back["answer"] == original["answer"]
    im = back[0]["image"]
    assert isinstance(im, Image.Image)
    ref = Image.open(io.BytesIO(_png_bytes(REPO_GEOMETRY3K / "val" / original[0]["id"] / "img_diagram.png")))
    assert im.size == ref.size
    assert im.convert("RGB").tobytes() == ref.convert("RGB").tobytes()
