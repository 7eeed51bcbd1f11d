"""data.dataset=files: user data in EasyR1's format (jsonl / json / parquet / folders / hub@split), images in every
form, <image> placement, several images per prompt, and bad input named by file, row and field."""

import io
import json
import warnings
from pathlib import Path

import pytest
from PIL import Image
from user_data import write_dataset

from mm_gmpo.data import DataError
from mm_gmpo.data.files import Columns, load_file_prompts, parse_source
from mm_gmpo.data.processing import encode_prompt, encode_prompts, load_processor

PIX = {"min_pixels": 3136, "max_pixels": 12544}


@pytest.fixture(scope="module")
def processor():
    return load_processor()


def png(color=(200, 30, 30), size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def user_content(p):
    return p.messages[-1]["content"]


def test_parse_source_split_suffix(tmp_path):
    assert parse_source("hiyouga/geometry3k@train") == ("hiyouga/geometry3k", "train")
    assert parse_source("hiyouga/geometry3k") == ("hiyouga/geometry3k", "train")  # the hub default
    assert parse_source("hiyouga/geometry3k", "test") == ("hiyouga/geometry3k", "test")
    assert parse_source("data/x.jsonl") == ("data/x.jsonl", None)
    assert parse_source("./folder@val") == ("./folder", "val")
    odd = tmp_path / "a@b"
    odd.mkdir()
    assert parse_source(str(odd)) == (str(odd), None)  # an existing path is never split at '@'


def test_jsonl_rows_with_0_1_2_images_and_placeholders(tmp_path, processor):
    path = write_dataset(tmp_path, 6, seed=0)
    prompts = load_file_prompts(str(path), template="plain")
    assert [p.n_images for p in prompts] == [0, 1, 2, 0, 1, 2]
    assert [p.ground_truth for p in prompts[:3]] == ["red"] * 3 and prompts[3].ground_truth == "green"
    assert prompts[0].messages == [{"role": "user", "content": prompts[0].messages[0]["content"]}]
    assert isinstance(user_content(prompts[0]), str)  # text-only: plain content
    assert [c["type"] for c in user_content(prompts[1])] == ["image", "text"]  # no placeholder: image first
    assert [c["type"] for c in user_content(prompts[2])] == ["text", "image", "text", "image", "text"]
    assert prompts[2].id == "train/train-2" and prompts[2].metadata["source"].endswith("train.jsonl line 3")
    # the processor renders each image where its placeholder was; one pad run per image, checked per image
    enc = encode_prompt(prompts[2], processor, **PIX)
    assert enc.text.index("First picture:") < enc.text.index("<|vision_start|>") < enc.text.index("Second picture")
    assert enc.image_grid_thw.shape[0] == 2 and len(enc.image_keys) == 2
    assert enc.n_image_tokens == sum(int(g.prod()) // 4 for g in enc.image_grid_thw)


def test_every_image_form_and_relative_paths(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(png())
    elsewhere = tmp_path / "other"
    elsewhere.mkdir()
    (elsewhere / "b.png").write_bytes(png((0, 0, 200)))
    rows = [
        {"problem": "one", "answer": "1", "images": "imgs/a.png"},                      # a single path
        {"problem": "two", "answer": 2, "images": [{"path": str(elsewhere / "b.png")}]},  # HF dict, absolute
        {"problem": "three", "answer": "3", "images": [{"bytes": None, "path": "imgs/a.png"}, "imgs/a.png"]},
        {"problem": "four", "answer": "4", "images": []},
        {"problem": "five", "answer": "5", "images": None},
    ]
    f = tmp_path / "d.json"
    f.write_text(json.dumps(rows))
    ps = load_file_prompts(str(f))
    assert [p.n_images for p in ps] == [1, 1, 2, 0, 0]
    assert ps[1].ground_truth == "2" and ps[1].images[0].getpixel((0, 0)) == (0, 0, 200)
    assert all(im.mode == "RGB" for p in ps for im in p.images)
    # data.image_dir: relative paths start there instead of at the file's folder
    g = elsewhere / "d.jsonl"
    g.write_text(json.dumps({"problem": "x", "answer": "1", "images": ["a.png"]}) + "\n")
    assert load_file_prompts(str(g), image_dir=tmp_path / "imgs")[0].n_images == 1


def test_parquet_with_hf_image_features_in_a_folder_with_splits(tmp_path):
    """The hiyouga/geometry3k layout (images as a list of HF Image features, <image> in the problem), loaded
    from a folder by split, with no conversion."""
    import datasets

    feats = datasets.Features(images=datasets.List(datasets.Image()), problem=datasets.Value("string"),
                              answer=datasets.Value("string"))
    for split, n in (("train", 3), ("test", 2)):
        ds = datasets.Dataset.from_dict({"images": [[{"bytes": png(), "path": None}]] * n,
                                         "problem": [f"<image>Find x. ({split} {i})" for i in range(n)],
                                         "answer": [str(i) for i in range(n)]}, features=feats)
        (tmp_path / "data").mkdir(exist_ok=True)
        ds.to_parquet(str(tmp_path / "data" / f"{split}-00000-of-00001.parquet"))
    train = load_file_prompts(f"{tmp_path}@train", template="think_boxed")
    test = load_file_prompts(f"{tmp_path}@test")
    assert len(train) == 3 and len(test) == 2 and all(p.n_images == 1 for p in train + test)
    content = user_content(train[0])
    assert content[0] == {"type": "image"} and content[1]["text"].startswith("Find x. (train 0)")
    assert "\\boxed{}" in content[1]["text"]  # the template went around the text, the image kept its place
    # no split: the train files, as for a hub id (evaluation's default: the test files here); never both
    assert len(load_file_prompts(str(tmp_path))) == 3
    assert len(load_file_prompts(str(tmp_path), default_split="test")) == 2


def test_a_local_folder_without_a_split_reads_its_train_files_and_says_which(capsys):
    colors = Path(__file__).resolve().parents[1] / "examples" / "colors"
    assert len(load_file_prompts(str(colors))) == 120  # train.jsonl only (not val.jsonl's 24 as well)
    assert f"data: {colors}: read 1 file(s): train.jsonl" in capsys.readouterr().out
    assert len(load_file_prompts(str(colors), default_split="test")) == 24  # evaluation: val.jsonl
    assert len(load_file_prompts(f"{colors}@val")) == 24


def test_column_mapping_and_system_prompt(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"question": "2+2?", "solution": 4, "pics": []}) + "\n")
    p = load_file_prompts(str(f), columns=Columns("question", "solution", "pics"), system_prompt="Be brief.",
                          template="plain", task="exact")[0]
    assert p.messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    assert p.ground_truth == "4" and p.task == "exact"


def bad_rows(tmp_path: Path) -> list[tuple[dict | str, str]]:
    (tmp_path / "ok.png").write_bytes(png())
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    data = png(size=(64, 64))
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])  # valid header, data cut
    (tmp_path / "dir.png").mkdir()
    return [
        ({"problem": "p", "answer": "1", "images": ["missing.png"]}, "field 'images': image file"),
        ({"problem": "p", "answer": "1", "images": ["broken.png"]}, "is not a readable image"),
        ({"problem": "p", "answer": "1", "images": ["truncated.png"]}, "is not a readable image"),
        ({"problem": "p", "answer": "1", "images": ["dir.png"]}, "is not a regular file"),
        ({"problem": "p", "answer": "1", "images": [3]}, "field 'images' holds a int"),
        ({"answer": "1", "images": ["ok.png"]}, "field 'problem' missing"),
        ({"problem": ["p"], "answer": "1"}, "field 'problem' must be non-empty text"),
        ({"problem": "p"}, "field 'answer' missing"),
        ({"problem": "p", "answer": True}, "field 'answer' must be non-empty text or a number"),
        ({"problem": "<image> and <image>", "answer": "1", "images": ["ok.png"]},
         "2 <image> placeholder(s) but 1 image(s)"),
        ({"problem": "p <|image_pad|>", "answer": "1"}, "special token <|image_pad|>"),
        ({"problem": "<video> what moves?", "answer": "1", "videos": ["clip.mp4"]},
         "field 'videos': video "),
        ({"problem": "<video> what moves?", "answer": "1"}, "1 <video> placeholder(s) but 0 video(s)"),
        ({"problem": "what moves?", "answer": "1", "videos": "clip.mp4"}, "clip.mp4 not found"),
        ("[1, 2]", "a row must be a JSON object"),
        ("{not json", "not valid JSON"),
    ]


def test_bad_input_names_file_row_and_field(tmp_path):
    cases = bad_rows(tmp_path)
    good = json.dumps({"problem": "fine", "answer": "1", "images": ["ok.png"]})
    for row, message in cases:
        f = tmp_path / "d.jsonl"
        f.write_text(good + "\n" + (row if isinstance(row, str) else json.dumps(row)) + "\n")
        with pytest.raises(DataError) as e:
            load_file_prompts(str(f))
        assert message in str(e.value) and f"{f} line 2" in str(e.value), (message, str(e.value))


def test_skip_mode_drops_counts_and_keeps_the_good_rows(tmp_path):
    cases = bad_rows(tmp_path)
    good = {"problem": "fine", "answer": "1", "images": ["ok.png"]}
    f = tmp_path / "d.jsonl"
    f.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r, _ in cases) + json.dumps(good))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        prompts = load_file_prompts(str(f), on_bad_sample="skip")
    assert len(prompts) == 1 and prompts[0].ground_truth == "1"
    assert any(f"skipped {len(cases)} bad sample(s)" in str(x.message) for x in w)


def test_max_images_drops_with_a_counted_warning(tmp_path):
    from mm_gmpo.data.prompts import limit_images

    path = write_dataset(tmp_path, 9, seed=0)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        prompts = limit_images(load_file_prompts(str(path)), 1, str(path))
    assert [p.n_images for p in prompts] == [0, 1] * 3
    assert any("dropped 3 prompt(s) with more than data.max_images=1" in str(x.message) for x in w)
    with pytest.raises(DataError, match=r"data\.max_images=0 drops every prompt"):
        limit_images([p for p in prompts if p.n_images], 0, str(path))


def test_missing_sources_and_unknown_types(tmp_path):
    with pytest.raises(DataError, match="no such file or folder"):
        load_file_prompts(str(tmp_path / "nope.jsonl"))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported file type"):
        load_file_prompts(str(tmp_path / "x.csv"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no \.jsonl/\.json/\.parquet files"):
        load_file_prompts(str(tmp_path / "empty"))
    (tmp_path / "blank.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no usable samples"):
        load_file_prompts(str(tmp_path / "blank.jsonl"))


def test_same_picture_in_two_prompts_has_one_key(tmp_path, processor):
    (tmp_path / "a.png").write_bytes(png())
    (tmp_path / "b.png").write_bytes(png((0, 200, 0)))
    rows = [{"problem": "x", "answer": "1", "images": ["a.png", "b.png"]},
            {"problem": "y", "answer": "2", "images": ["b.png"]}]
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    enc, _ = encode_prompts(load_file_prompts(str(f)), processor, max_prompt_length=512, **PIX)
    assert enc[0].image_keys[1] == enc[1].image_keys[0] != enc[0].image_keys[0]


def test_an_empty_videos_field_is_no_clip(tmp_path):
    """EasyR1 rows of picture data may carry "videos": [] or null: they load as they are."""
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"problem": "p", "answer": "1", "videos": []}) + "\n"
                 + json.dumps({"problem": "q", "answer": "2", "videos": None}) + "\n")
    assert [p.ground_truth for p in load_file_prompts(str(f))] == ["1", "2"]
