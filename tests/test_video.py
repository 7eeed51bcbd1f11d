"""Video prompts end to end on CPU: clips read from video files, frame folders and frame lists (and every bad input a
DataError naming file, row and field); one prompt form per family, built once, the same ids whatever transformers
writes; the policy's log-probs on clips equal each family's own transformers forward in float64, packed = padded =
alone, a clip shared by several prompts encoded once with the same log-probs and gradients, and batches that mix
clips, pictures and text-only prompts."""

import json
import random
from pathlib import Path

import pytest
import torch

from mm_gmpo.data.files import Columns, load_file_prompts
from mm_gmpo.data.processing import encode_prompt, load_processor
from mm_gmpo.data.prompts import DataError, Prompt
from mm_gmpo.data.synthetic import COLORS, SHAPES, draw
from mm_gmpo.data.videos import ClipStore, VideoFit, clip_from_frames, read_video_file
from mm_gmpo.models import build_model, processor_source, random_model_config
from mm_gmpo.policy import Policy, collate

SLOW = pytest.mark.slow
FAMILIES = ["tiny-random", pytest.param("tiny-random-qwen2-vl", marks=SLOW), "tiny-random-qwen3-vl",
            pytest.param("tiny-random-qwen3-vl-moe", marks=SLOW)]
PAD = 151643
PIX = {"min_pixels": 3136, "max_pixels": 20_000}


def frames(n: int = 8, h: int = 56, w: int = 84, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, h, w), generator=g, dtype=torch.uint8)


def fit_for(processor) -> VideoFit:
    return VideoFit(min_pixels=3136, max_pixels=8000, patch_size=processor.image_processor.patch_size)


def tiny(family: str, dtype=torch.float64, seed: int = 0):
    return build_model("t", random_init=True, config=random_model_config(family), dtype=dtype, seed=seed)


def video_prompt(clips: list, images: list, idx: int) -> Prompt:
    content = [{"type": "video"} for _ in clips] + [{"type": "image"} for _ in images]
    content.append({"type": "text", "text": f"Problem {idx}: which way does it move?"})
    msgs = [{"role": "user", "content": content if clips or images else f"Problem {idx}, text only."}]
    return Prompt(id=f"v/{idx}", task="exact", messages=msgs, images=images, ground_truth="left", videos=clips)


def pictures(n: int, seed: int) -> list:
    rng = random.Random(seed)
    return [draw(rng.choice(list(COLORS)), rng.choice(SHAPES), rng, size=56) for _ in range(n)]


def responses(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 151000, (int(x),), generator=g).tolist() for x in torch.randint(3, 10, (n,), generator=g)]


def batch_of(encs, resp, dtype=torch.float64):
    def cast(t):
        return None if t is None else t.to(dtype)

    return collate([e.input_ids for e in encs], resp, pad_id=PAD,
                   pixel_values=[cast(e.pixel_values) for e in encs], image_grid_thw=[e.image_grid_thw for e in encs],
                   image_ids=[e.image_keys for e in encs],
                   pixel_values_videos=[cast(e.pixel_values_videos) for e in encs],
                   video_grid_thw=[e.video_grid_thw for e in encs], video_ids=[e.video_keys for e in encs],
                   video_seconds=[e.video_seconds for e in encs])


def own_forward(model, enc, resp) -> torch.Tensor:
    """transformers' own forward (its M-RoPE from mm_token_type_ids, its own vision merge and DeepStack) on the
    prompt's ids, pictures and clip, float64: log p of each response token."""
    ids = torch.tensor([enc.input_ids + resp])
    types = (ids == 151655).long() + 2 * (ids == 151656).long()
    kw = {"pixel_values_videos": enc.pixel_values_videos.double(), "video_grid_thw": enc.video_grid_thw}
    if enc.pixel_values is not None:
        kw |= {"pixel_values": enc.pixel_values.double(), "image_grid_thw": enc.image_grid_thw}
    if model.config.model_type == "qwen2_5_vl":
        kw["second_per_grid_ts"] = torch.tensor(enc.video_seconds)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=types, **kw).logits
    P = len(enc.input_ids)
    return torch.log_softmax(logits[0, P - 1:-1].double(), -1).gather(-1, torch.tensor(resp)[:, None])[:, 0]


# ---------------------------------------------------------------- one prompt form per family


def test_qwen2_5_vl_ids_and_pixels_equal_the_processors_own():
    """Qwen2.5-VL: the ids written here equal transformers' processor given the same frames (and pictures), and so
    do the clip's pixels, grid and second_per_grid_ts."""
    processor = load_processor(processor_source("tiny-random"))
    clip = clip_from_frames(frames(), fit_for(processor), fps=4.0)
    enc = encode_prompt(video_prompt([clip], pictures(1, 0), 0), processor, **PIX)
    out = processor(text=[enc.text.replace("<|video_pad|>" * enc.n_video_tokens, "<|video_pad|>").replace(
        "<|image_pad|>" * enc.n_image_tokens, "<|image_pad|>")], images=enc.images, videos=[clip.frames],
        do_resize=False, do_sample_frames=False, video_metadata=[clip.metadata()], return_tensors="pt")
    assert out["input_ids"][0].tolist() == enc.input_ids
    assert torch.equal(out["pixel_values_videos"], enc.pixel_values_videos)
    assert out["video_grid_thw"].tolist() == enc.video_grid_thw.tolist() == [[4, 4, 6]]
    assert out["second_per_grid_ts"].tolist() == enc.video_seconds == [0.5]  # 2 frames per temporal patch at 4 fps
    assert torch.equal(out["pixel_values"], enc.pixel_values)


def test_qwen3_vl_ids_are_the_released_processors_form():
    """Qwen3-VL: each temporal patch is written `<t seconds><|vision_start|>pads<|vision_end|>`, the template's own
    vision_start/end pair replaced (the released processor's form, and vLLM's), whatever transformers 5.x writes."""
    processor = load_processor(processor_source("tiny-random-qwen3-vl"))
    clip = clip_from_frames(frames(), fit_for(processor), fps=2.0)
    enc = encode_prompt(video_prompt([clip], [], 0), processor, **PIX)
    t, h, w = enc.video_grid_thw[0].tolist()
    group = "<|vision_start|>" + "<|video_pad|>" * (h * w // 4) + "<|vision_end|>"
    expected = "".join(f"<{s} seconds>{group}" for s in ("0.2", "1.2", "2.2", "3.2"))
    assert t == 4 and expected in enc.text and "<|vision_start|><0.2" not in enc.text
    assert clip.timestamps() == [0.25, 1.25, 2.25, 3.25]
    tok = processor.tokenizer
    assert enc.input_ids == tok(enc.text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------- the policy on clips


@pytest.mark.parametrize("family", FAMILIES)
def test_logprobs_equal_the_models_own_forward_with_a_clip_and_a_picture(family):
    processor = load_processor(processor_source(family))
    model = tiny(family)
    # 2 temporal patches: transformers 5.x and the released rule agree on where the text after the clip starts
    clip = clip_from_frames(frames(n=4, seed=1), fit_for(processor), fps=3.0)
    enc = encode_prompt(video_prompt([clip], pictures(1, 1), 0), processor, **PIX)
    (resp,) = responses(1, seed=1)
    ref = own_forward(model, enc, resp)
    with torch.no_grad():
        lp, _ = Policy(model)(batch_of([enc], [resp]))
    torch.testing.assert_close(lp[0].double(), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("family", ["tiny-random", "tiny-random-qwen2-vl", "tiny-random-qwen3-vl"])
def test_text_after_a_long_clip_continues_from_its_last_position(family):
    """The released models' M-RoPE rule (and vLLM's): text after a clip starts at the clip's largest position + 1.
    For 4 temporal patches at 2 fps in a 2x3 merged grid the time positions reach 6 (Qwen2.5-VL: 2 tokens per second
    x 1 s per patch; Qwen2-VL: one per patch, 3), past the grid's sides, where transformers 5.x would start the
    text at the clip's start + 3. Qwen3-VL writes a clip as one-frame groups, where the two rules agree."""
    from mm_gmpo.families import family_of

    processor = load_processor(processor_source(family))
    model = tiny(family, torch.float32)
    clip = clip_from_frames(frames(n=8, h=56, w=84), VideoFit(min_pixels=3136, max_pixels=5000,
                                                            patch_size=processor.image_processor.patch_size))
    enc = encode_prompt(video_prompt([clip], [], 0), processor, **PIX)
    b = batch_of([enc], [[1, 2]], torch.float32)
    pos = Policy(model).position_ids(b)[:, 0]
    ids = b.input_ids[0]
    vid = (ids == 151656).nonzero()[:, 0]
    first, last = int(vid[0]), int(vid[-1])
    start = int(pos[0, first])
    block = pos[:, first:last + 1]
    assert int(block.max()) + 1 == int(pos[0, last + 1]) == int(pos[1, last + 1]) == int(pos[2, last + 1])
    t, h, w = (int(x) for x in enc.video_grid_thw[0])
    if family == "tiny-random-qwen3-vl":
        ref, _ = model.model.get_rope_index(b.input_ids, mm_token_type_ids=(b.input_ids == 151656).int() * 2,
                                            video_grid_thw=enc.video_grid_thw, attention_mask=b.attention_mask)
        assert torch.equal(pos, ref[:, 0])
    else:
        tps = 2 if family == "tiny-random" else 1
        assert t == 4 and (h // 2, w // 2) == (2, 3) and int(block[0].max()) == start + 3 * tps
        assert family_of(model.config).rope_index(model.model, b.input_ids, (b.input_ids == 151656).int() * 2,
                                                  video_grid_thw=enc.video_grid_thw, second_per_grid_ts=b.video_seconds,
                                                  attention_mask=b.attention_mask)[0][:, 0].equal(pos)


def mixed_batch(processor, seed: int = 0):
    """A clip prompt, a prompt with a clip and 2 pictures, a text-only prompt, a 2-picture prompt, the clip again."""
    fit = fit_for(processor)
    clip = clip_from_frames(frames(seed=seed), fit, fps=2.0)
    other = clip_from_frames(frames(n=6, h=60, w=60, seed=seed + 1), fit, fps=3.0)
    pics = pictures(2, seed)
    encs = [encode_prompt(video_prompt(c, p, i), processor, **PIX)
            for i, (c, p) in enumerate([([clip], []), ([other], pics), ([], []), ([], pics), ([clip], [])])]
    return encs, responses(len(encs), seed)


@pytest.mark.parametrize(("family", "with_grad"), [(f, g) for f in ["tiny-random", "tiny-random-qwen3-vl"]
                                                   for g in (True, False)])
def test_mixed_batch_packed_equals_padded_and_each_alone(family, with_grad):
    processor = load_processor(processor_source(family))
    model = tiny(family)
    encs, resp = mixed_batch(processor, seed=3)
    b = batch_of(encs, resp)
    assert b.videos_per_sample == [1, 1, 0, 0, 1] and b.images_per_sample == [0, 2, 0, 2, 0]
    assert b.video_keys == [0, 1, 0]  # the clip of prompts 0 and 4 is held once
    w = torch.randn(b.response_mask.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    outs = []
    for packed in (False, True):
        model.zero_grad()
        policy = Policy(model, chunk_size=7, packed=packed)
        with torch.set_grad_enabled(with_grad):
            lp, _ = policy(b)
            if with_grad:
                (lp.double() * w).sum().backward()
        outs.append((lp.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (lp0, g0), (lp1, g1) = outs
    torch.testing.assert_close(lp1, lp0, rtol=0, atol=1e-6)
    if with_grad:
        assert any("visual" in n for n in g0) and set(g0) == set(g1)
        for n in g0:
            torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-7)
    else:
        with torch.no_grad():
            for i, (e, r) in enumerate(zip(encs, resp, strict=True)):
                alone, _ = Policy(model)(batch_of([e], [r]))
                torch.testing.assert_close(lp0[i, :len(r)], alone[0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", ["tiny-random", "tiny-random-qwen3-vl"])
def test_a_clip_shared_by_prompts_is_encoded_once_with_the_same_logprobs_and_gradients(family):
    processor = load_processor(processor_source(family))
    clip = clip_from_frames(frames(seed=5), fit_for(processor))
    encs = [encode_prompt(video_prompt([clip], [], i), processor, **PIX) for i in range(3)]
    resp = responses(3, seed=6)
    shared = batch_of(encs, resp)
    copies = collate([e.input_ids for e in encs], resp, pad_id=PAD,
                     pixel_values_videos=[e.pixel_values_videos.double().clone() for e in encs],
                     video_grid_thw=[e.video_grid_thw for e in encs], video_seconds=[e.video_seconds for e in encs])
    assert shared.video_keys == [0, 0, 0] and copies.video_keys == [0, 1, 2]
    assert shared.pixel_values_videos.shape[0] * 3 == copies.pixel_values_videos.shape[0]
    model = tiny(family)
    outs = []
    for batch in (copies, shared):
        model.zero_grad()
        policy = Policy(model, packed=True)
        lp, _ = policy(batch)
        lp.sum().backward()
        outs.append((lp.detach(), policy.vision_patches, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (lp0, n0, g0), (lp1, n1, g1) = outs
    assert n0 == 3 * n1 == 3 * int(encs[0].video_grid_thw.prod())
    torch.testing.assert_close(lp1, lp0, rtol=0, atol=1e-6)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-7)


def test_select_keeps_each_samples_clips_and_seconds():
    processor = load_processor(processor_source("tiny-random"))
    encs, resp = mixed_batch(processor)
    b = batch_of(encs, resp)
    sub = b.select([1, 4])
    assert sub.videos_per_sample == [1, 1] and sub.video_keys == [0, 1]
    assert sub.video_seconds.tolist() == [encs[1].video_seconds[0], encs[4].video_seconds[0]] == [2 / 3, 1.0]
    assert torch.equal(sub.pixel_values_videos, torch.cat([encs[1].pixel_values_videos, encs[4].pixel_values_videos]))
    only_text = b.select([2])
    assert only_text.pixel_values_videos is None and only_text.video_grid_thw is None and not only_text.has_vision


@pytest.mark.parametrize("family", ["tiny-random", "tiny-random-qwen3-vl"])
def test_hf_engine_after_sync_samples_what_the_trainer_scores_on_clips(family):
    """transformers' generate on clip prompts (its own M-RoPE for video, second_per_grid_ts) gives the log-probs
    the policy computes for the same tokens, after a weight sync."""
    from mm_gmpo.rollout.base import SamplingParams
    from mm_gmpo.rollout.batch import to_batch
    from mm_gmpo.rollout.hf import HFEngine
    from mm_gmpo.weight_sync import sync_weights

    processor = load_processor(processor_source(family))
    trainer = tiny(family, torch.float32, 0)
    engine = HFEngine(tiny(family, torch.float32, 1), processor.tokenizer)
    encs, _ = mixed_batch(processor, seed=8)
    sync_weights(Policy(trainer), engine)
    rollouts = engine.generate(encs, SamplingParams(n=2, temperature=1.0, max_tokens=5, seed=0))
    batch, sampler_lp = to_batch(encs, rollouts, PAD)
    assert batch.video_keys == [0, 0, 1, 1, 0, 0] and batch.videos_per_sample == [1, 1, 1, 1, 0, 0, 0, 0, 1, 1]
    with torch.no_grad():
        lp, _ = Policy(trainer)(batch)
    torch.testing.assert_close(lp * batch.response_mask, sampler_lp, rtol=0, atol=2e-5)


# ---------------------------------------------------------------- clips from data files


def mp4(path: Path, n: int = 20, fps: int = 4, faststart: bool = False) -> Path:
    """A small MPEG-4 file of ``n`` random frames (60x90)."""
    import av

    with av.open(str(path), mode="w", format="mp4", options={"movflags": "faststart"} if faststart else {}) as out:
        s = out.add_stream("mpeg4", rate=fps)
        s.width, s.height, s.pix_fmt = 90, 60, "yuv420p"
        for f in frames(n, 60, 90):
            for packet in s.encode(av.VideoFrame.from_ndarray(f.permute(1, 2, 0).contiguous().numpy(), format="rgb24")):
                out.mux(packet)
        for packet in s.encode():
            out.mux(packet)
    return path


def rows_file(tmp_path: Path, rows: list[dict]) -> str:
    f = tmp_path / "data.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(f)


def load(spec: str, **kw):
    return load_file_prompts(spec, columns=Columns(), template="plain", task="exact", **kw)


def test_a_video_file_is_sampled_as_qwen_vl_utils_samples_it(tmp_path):
    """20 frames at 4 fps (5 s) at data.video_fps 2: qwen-vl-utils' smart_nframes gives 10 frames at evenly spaced
    indices; only those are decoded, resized by its rule (sides a multiple of 28)."""
    from qwen_vl_utils.vision_process import smart_nframes

    clip = read_video_file(mp4(tmp_path / "a.mp4"), VideoFit(), "row 1")
    n = smart_nframes({"fps": 2.0, "max_frames": 20}, total_frames=20, video_fps=4.0)
    assert n == 10 == clip.n_frames
    assert list(clip.indices) == torch.linspace(0, 19, 10).round().long().tolist()
    assert clip.fps == 4.0 and clip.sample_fps == 2.0 and clip.total_frames == 20
    assert clip.frames.dtype == torch.uint8 and tuple(clip.frames.shape[1:]) == (3, 56, 84)
    capped = read_video_file(tmp_path / "a.mp4", VideoFit(max_frames=4), "row 1")
    assert capped.n_frames == 4 and capped.indices == (0, 6, 13, 19)


def test_easyr1_rows_with_videos_load_as_files_folders_and_frame_lists(tmp_path):
    mp4(tmp_path / "clip.mp4")
    folder = tmp_path / "frames"
    folder.mkdir()
    from PIL import Image

    for i in (1, 2, 10):  # natural order: frame_2 before frame_10
        Image.new("RGB", (84, 56), (20 * i, 0, 0)).save(folder / f"frame_{i}.png")
    rows = [{"problem": "<video> Which way?", "answer": "left", "videos": ["clip.mp4"]},
            {"problem": "What happens in <video>?", "answer": "up", "videos": "frames"},
            {"problem": "Compare <video> and <image>.", "answer": "down", "images": ["frames/frame_1.png"],
             "videos": [["frames/frame_1.png", "frames/frame_2.png"]]},
            {"problem": "No clip here.", "answer": "right", "videos": []}]
    store = ClipStore()
    prompts = load(rows_file(tmp_path, rows), clips=store)
    assert [p.n_videos for p in prompts] == [1, 1, 1, 0] and prompts[2].n_images == 1
    assert prompts[0].messages[-1]["content"][0] == {"type": "video"}
    assert [c["type"] for c in prompts[2].messages[-1]["content"]] == ["text", "video", "text", "image", "text"]
    folder_clip = prompts[1].videos[0]
    assert folder_clip.n_frames == 4 and folder_clip.frames[:, 0, 0, 0].tolist() == [20, 40, 200, 200]  # padded even
    assert store.count == 3
    again = load(rows_file(tmp_path, rows[:1] * 3), clips=store)
    assert all(p.videos[0] is prompts[0].videos[0] for p in again)  # one decode per distinct file


BAD_VIDEO = {
    "truncated": (lambda p: p.write_bytes(mp4(p, faststart=True).read_bytes()[:18000]), "ends early"),
    "corrupt": (lambda p: p.write_bytes(mp4(p).read_bytes()[:40] + bytes(range(256)) * 40), "cannot be decoded"),
    "empty": (lambda p: p.write_bytes(b""), "is empty"),
    "not a video": (lambda p: p.write_text("just some text, not a video"), "not a video container"),
    "missing": (lambda p: None, "not found"),
}


@pytest.mark.parametrize("case", list(BAD_VIDEO))
def test_a_bad_video_file_is_a_data_error_naming_file_row_and_field(tmp_path, case):
    make, says = BAD_VIDEO[case]
    make(tmp_path / "bad.mp4")
    rows = [{"problem": "<video> ok?", "answer": "a", "videos": "bad.mp4"}]
    spec = rows_file(tmp_path, [{"problem": "fine", "answer": "b"}, *rows])
    with pytest.raises(DataError) as e:
        load(spec)
    msg = str(e.value)
    assert says in msg and "data.jsonl" in msg and "line 2" in msg and "field 'videos'" in msg
    with pytest.warns(UserWarning, match="skipped 1 bad sample"):
        kept = load(spec, on_bad_sample="skip")
    assert [p.ground_truth for p in kept] == ["b"]


def test_zero_frames_an_unknown_codec_and_the_memory_cap(tmp_path, monkeypatch):
    import av

    zero = tmp_path / "zero.mkv"
    with av.open(str(zero), mode="w", format="matroska") as out:
        s = out.add_stream("mpeg4", rate=4)
        s.width, s.height, s.pix_fmt = 90, 60, "yuv420p"
        out.start_encoding()
    with pytest.raises(DataError, match="zero frames"):
        read_video_file(zero, VideoFit(), "row 1: field 'videos'")
    avi = tmp_path / "c.avi"
    with av.open(str(avi), mode="w", format="avi") as out:
        s = out.add_stream("mpeg4", rate=4)
        s.width, s.height, s.pix_fmt = 90, 60, "yuv420p"
        for f in frames(4, 60, 90):
            for packet in s.encode(av.VideoFrame.from_ndarray(f.permute(1, 2, 0).contiguous().numpy(),
                                                              format="rgb24")):
                out.mux(packet)
        for packet in s.encode():
            out.mux(packet)
    assert read_video_file(avi, VideoFit(), "r").n_frames == 4  # qwen-vl-utils keeps at least 4
    avi.write_bytes(avi.read_bytes().replace(b"FMP4", b"QQQQ"))  # a codec tag no decoder knows
    with pytest.raises(DataError, match="codec is not one this FFmpeg decodes"):
        read_video_file(avi, VideoFit(), "row 2")
    import mm_gmpo.data.videos as videos

    monkeypatch.setattr(videos, "MAX_CLIP_BYTES", 10 * 60 * 90 * 3 - 1)  # one byte short of 10 frames
    with pytest.raises(DataError, match=r"over the .* cap; lower data\.video_max_frames"):
        read_video_file(mp4(tmp_path / "a.mp4"), VideoFit(), "row 3")
    assert read_video_file(tmp_path / "a.mp4", VideoFit(max_frames=8), "row 3").n_frames == 8


def test_bad_clip_entries_in_rows(tmp_path):
    (tmp_path / "empty_folder").mkdir()
    mp4(tmp_path / "clip.mp4")
    cases = [({"problem": "<video>", "answer": "a", "videos": "empty_folder"}, "holds no frame images"),
             ({"problem": "<video> and <video>", "answer": "a", "videos": ["clip.mp4"]},
              "2 <video> placeholder(s) but 1 video(s)"),
             ({"problem": "<video>", "answer": "a", "videos": 5}, "holds a int"),
             ({"problem": "<video>", "answer": "a", "videos": [[]]}, "empty list of frames"),
             ({"problem": "x <|video_pad|>", "answer": "a"}, "special token <|video_pad|>")]
    for row, says in cases:
        with pytest.raises(DataError, match=says.replace("(", r"\(").replace(")", r"\)").replace("|", r"\|")):
            load(rows_file(tmp_path, [row]))


@pytest.mark.parametrize("family", ["tiny-random", "tiny-random-qwen3-vl"])
def test_the_vision_tower_runs_once_per_forward_over_pictures_and_clips(family):
    """Under FSDP every rank must gather the tower's shards the same number of times in each micro-batch: a batch
    with pictures and clips calls the tower once (as one with either alone, or the blank pass for text only)."""
    processor = load_processor(processor_source(family))
    model = tiny(family, torch.float32)
    calls = []
    model.model.visual.register_forward_hook(lambda *a: calls.append(1))
    encs, resp = mixed_batch(processor, seed=4)
    policy = Policy(model)
    policy.always_run_vision = True
    for idx in ([0, 1, 2, 3, 4], [1], [0], [3], [2]):  # both kinds, clip + pictures, clip, pictures, text only
        calls.clear()
        with torch.no_grad():
            policy(batch_of([encs[i] for i in idx], [resp[i] for i in idx], torch.float32))
        assert len(calls) == 1, idx


def test_frame_lists_keep_their_times_when_thinned_or_padded(tmp_path):
    """A frame list longer than data.video_max_frames keeps evenly spaced frames at their own times (indices into
    the list, the list's length as the total); an odd count gets its last frame twice at the same rate."""
    from PIL import Image

    from mm_gmpo.data.videos import read_frame_images

    paths = []
    for i in range(9):
        paths.append(tmp_path / f"f{i}.png")
        Image.new("RGB", (56, 56), (i * 25, 0, 0)).save(paths[-1])
    thin = read_frame_images(paths, VideoFit(max_frames=4), "row 1")
    assert thin.indices == (0, 3, 5, 8) and thin.total_frames == 9 and thin.frames[:, 0, 0, 0].tolist() == [0, 75, 125, 200]
    assert thin.sample_fps == pytest.approx(4 / 9 * 2.0) and thin.timestamps() == [0.75, 3.25]
    odd = read_frame_images(paths[:3], VideoFit(), "row 2")
    assert odd.indices == (0, 1, 2, 2) and odd.sample_fps == 2.0 and odd.frames[:, 0, 0, 0].tolist() == [0, 25, 50, 50]
