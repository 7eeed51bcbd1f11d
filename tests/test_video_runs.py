"""Video clips in whole runs (slow tier): EasyR1-style rows with video files, a frame folder, pictures and text
train under torchrun on 2 ranks and evaluate; the built-in video task's reward rises above chance."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def video_rows(folder: Path) -> Path:
    """A jsonl in EasyR1's format: clips as MP4 files, a frame folder, a picture beside a clip, a text-only row."""
    import random

    from PIL import Image
    from test_video import mp4

    from mm_gmpo.data.synthetic import flashing_screen

    rng = random.Random(0)
    (folder / "clips").mkdir(parents=True)
    rows = []
    for i in range(8):
        count = i % 4 + 1
        path = folder / "clips" / f"c{i}.mp4"
        mp4(path, n=8, fps=2)
        rows.append({"problem": "<video> How many times does the screen flash blue?", "answer": str(count),
                     "videos": [f"clips/c{i}.mp4"]})
    frames = folder / "frames"
    frames.mkdir()
    for k, f in enumerate(flashing_screen(2, rng)):
        Image.fromarray(f.permute(1, 2, 0).numpy()).save(frames / f"frame_{k}.png")
    Image.new("RGB", (56, 56), (30, 70, 220)).save(folder / "blue.png")
    rows += [{"problem": "What happens in <video>?", "answer": "2", "videos": "frames"},
             {"problem": "<image> then <video>: how many flashes?", "answer": "3", "images": ["blue.png"],
              "videos": ["clips/c2.mp4"]},
             {"problem": "How many flashes are in no video at all?", "answer": "1"}]
    path = folder / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.mark.slow
def test_easyr1_rows_with_video_files_train_on_two_ranks_and_evaluate(tmp_path):
    data = video_rows(tmp_path)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "scripts" / "train_mm.py"), "--config", str(ROOT / "configs" / "tiny_video.yaml"),
           "data.dataset=files", f"data.train_files={data}", f"data.val_files={data}", "data.task=exact",
           "data.template=plain", "data.min_pixels=3136", "data.max_pixels=12544", "rollout.allowed_tokens=['1','2','3','4']",
           "trainer.total_steps=2", "trainer.eval_every=2", "trainer.rollout_batch_size=8",
           "trainer.mini_batch_size=4", "trainer.save_every=2", "trainer.export_hf=false",
           f"trainer.output_dir={out}"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=ENV, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "clips held" in r.stdout
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in rows] == [1, 2] and all(x["loss/policy"] == x["loss/policy"] for x in rows)
    assert any(k.startswith("eval/") for k in rows[-1])
    ev = subprocess.run([sys.executable, str(ROOT / "scripts" / "eval_files.py"), "--model", "tiny-random",
                         "--backend", "oracle", "--data", str(data), "--n", "2", "--temperature", "1.0",
                         "--video-min-pixels", "3136", "--video-max-pixels", "3136", "--out", str(tmp_path / "ev")],
                        capture_output=True, text=True, timeout=600, env=ENV, cwd=ROOT)
    assert ev.returncode == 0, ev.stdout[-3000:] + ev.stderr[-3000:]
    res = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert res["n_problems"] == 11 and res["k"] == 2 and res["accuracy"] == res["pass_at_k"] == 1.0, res


@pytest.mark.slow
def test_the_builtin_video_task_learns_on_two_ranks(tmp_path):
    """configs/tiny_video.yaml (how many times the screen flashes blue in 8-frame clips; chance 0.25), shortened to
    70 steps: the reward rises from chance and the greedy eval on 64 held-out clips ends far above it (measured:
    0.243 -> 0.691, eval 1.0; the full 300-step run, benchmarks/RESULTS.md: 10-step mean >= 0.9 from step 95)."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "scripts" / "train_mm.py"), "--config", str(ROOT / "configs" / "tiny_video.yaml"),
           "trainer.total_steps=70", "trainer.eval_every=70", "trainer.save_every=0", "trainer.export_hf=false",
           "logging.tensorboard=false", f"trainer.output_dir={out}"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=ENV, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    reward = [x["reward/mean"] for x in rows]
    first, last = sum(reward[:10]) / 10, sum(reward[-10:]) / 10
    print(f"\ntiny_video, 70 steps: reward first 10 {first:.3f}, last 10 {last:.3f}, eval {rows[-1]['eval/accuracy']:.3f}")
    assert first < 0.4 and last > 0.6 and rows[-1]["eval/accuracy"] >= 0.9
