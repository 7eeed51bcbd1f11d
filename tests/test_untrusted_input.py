"""Reliability and security, round 3 (issue 32): no file runs code (checkpoint pickles, image decoders), runs never
silently mix (resume=none over checkpoints, odd folder names, eval folders), memory and time are bounded by the
input, and bad input is one line or a DataError naming file, row and field."""

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


class _Boom:
    """Unpickling this runs ``os.system`` (what a crafted checkpoint file would do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _tiny_policy():
    from mm_gmpo.models import build_model, tiny_qwen2_5_vl_config
    from mm_gmpo.policy import Policy

    return Policy(build_model("t", random_init=True, config=tiny_qwen2_5_vl_config(hidden_size=32, layers=1,
                                                                                    vision_depth=1),
                              dtype=torch.float32, seed=0))


# ---------------------------------------------------------------- 1. checkpoint pickles


@pytest.mark.parametrize("manifest", ["recomputed", "deleted"])
def test_a_crafted_dcp_metadata_pickle_is_refused_and_runs_nothing(tmp_path, manifest):
    from mm_gmpo.checkpoint import (
        MANIFEST,
        CheckpointError,
        TrainerState,
        _digests,
        _files,
        load_checkpoint,
        resume_point,
        save_checkpoint,
    )

    policy = _tiny_policy()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)  # param groups: non-tensor values in the shards
    save_checkpoint(tmp_path, policy, optimizer, None, TrainerState(step=1))
    folder = tmp_path / "step_00000001"
    load_checkpoint(folder, policy, optimizer, None)  # an honest checkpoint loads through the restricted reader
    marker = tmp_path / "pwned"
    (folder / "model_optim" / ".metadata").write_bytes(pickle.dumps(_Boom(marker)))
    if manifest == "recomputed":  # integrity is no defence: the attacker rewrites the manifest too
        (folder / MANIFEST).write_text(json.dumps(_digests(folder, _files(folder))))
    else:
        (folder / MANIFEST).unlink()
    path, _ = resume_point(tmp_path)
    assert path == folder  # it verifies ...
    with pytest.raises(CheckpointError, match=r"\.metadata: refused to load: the file asks for posix\.system") as e:
        load_checkpoint(folder, policy, optimizer, None)  # ... and is still refused
    assert "\n" not in str(e.value)
    assert not marker.exists()


def test_the_restricted_unpickler_takes_dcp_metadata_and_nothing_else(tmp_path):
    import io

    from mm_gmpo.checkpoint import UnsafeCheckpoint, safe_unpickle

    for payload in (_Boom(tmp_path / "x"), eval, os.system, {"a": [print]}):
        with pytest.raises(UnsafeCheckpoint, match="refused to load"):
            safe_unpickle(io.BytesIO(pickle.dumps(payload)), "f")
    plain = {"a": (1, 2.5, "x", None, [True]), "s": torch.Size([2, 3]), "d": torch.bfloat16}
    assert safe_unpickle(io.BytesIO(pickle.dumps(plain)), "f") == plain
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------- 2. image decoders: an allow-list


EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n%%EndComments\n"
       b"newpath 0 0 moveto 8 8 lineto stroke showpage\n%%EOF\n")


def _png(size=(32, 32), color=(200, 30, 30)) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _fake_ghostscript(tmp_path, monkeypatch) -> Path:
    """A ``gs`` on PATH that leaves a marker when anything starts it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    marker = tmp_path / "ghostscript_ran"
    (bin_dir / "gs").write_text(f"#!/bin/sh\ntouch {marker}\nexit 1\n")
    (bin_dir / "gs").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return marker


@pytest.mark.parametrize("name", ["diagram.eps", "diagram.png"])  # by content, whatever the name says
def test_an_eps_image_is_a_data_error_naming_the_format_and_starts_no_program(tmp_path, monkeypatch, name):
    from mm_gmpo.data.files import load_file_prompts
    from mm_gmpo.data.prompts import DataError

    marker = _fake_ghostscript(tmp_path, monkeypatch)
    (tmp_path / name).write_bytes(EPS)
    (tmp_path / "ok.png").write_bytes(_png())
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"problem": "p", "answer": "1", "images": ["ok.png"]}) + "\n" +
                 json.dumps({"problem": "q", "answer": "2", "images": {"bytes": None, "path": name}}) + "\n")
    with pytest.raises(DataError, match=rf"d\.jsonl line 2: field 'images': .*{name} is not a readable image "
                                        r"\(format EPS\); images must be PNG"):
        load_file_prompts(str(f))
    with pytest.warns(UserWarning, match="skipped 1 bad sample"):
        assert len(load_file_prompts(str(f), on_bad_sample="skip")) == 1
    assert not marker.exists()


def test_geometry3k_images_from_folders_and_parquet_use_the_allow_list(tmp_path, monkeypatch):
    import shutil

    from mm_gmpo.data.geometry3k import REPO_GEOMETRY3K, geometry3k_prompts, load_geometry3k
    from mm_gmpo.data.prompts import DataError

    marker = _fake_ghostscript(tmp_path, monkeypatch)
    shutil.copytree(REPO_GEOMETRY3K / "test" / "2401", tmp_path / "g" / "test" / "2401")
    good = load_geometry3k(tmp_path / "g", "test")
    good.to_parquet(str(tmp_path / "unified.parquet"))
    (tmp_path / "g" / "test" / "2401" / "img_diagram.png").write_bytes(EPS)
    with pytest.raises(DataError, match=r"2401/img_diagram\.png: the image .* \(format EPS\)"):
        load_geometry3k(tmp_path / "g", "test")
    # a unified parquet whose image bytes were swapped: decoded with the allow-list when prompts are made
    ds = load_geometry3k(tmp_path / "unified.parquet", "test")
    from datasets import Image as ImageFeature

    ds = ds.cast_column("image", ImageFeature(decode=False)).map(lambda r: {"image": {"bytes": EPS, "path": None}})
    with pytest.raises(DataError, match=r"geometry3k \[test\] id 2401: field 'image'.*\(format EPS\)"):
        list(geometry3k_prompts(ds))
    assert not marker.exists()


# ---------------------------------------------------------------- 7. images: bounded memory


def test_images_are_kept_fitted_once_per_distinct_file_and_counted(tmp_path):
    from mm_gmpo.data.files import load_file_prompts
    from mm_gmpo.data.images import ImageFit, ImageStore
    from mm_gmpo.data.processing import resize_image

    (tmp_path / "big.png").write_bytes(_png((1600, 1200)))
    (tmp_path / "small.png").write_bytes(_png((56, 84), (0, 90, 0)))
    rows = [{"problem": f"p{i}", "answer": "1", "images": ["big.png"]} for i in range(6)]
    rows.append({"problem": "q", "answer": "2", "images": ["small.png", str(tmp_path / "big.png")]})
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    store = ImageStore(ImageFit(3136, 12544, 14))
    prompts = load_file_prompts(str(tmp_path / "d.jsonl"), images=store)
    big = prompts[0].images[0]
    assert all(p.images[0] is big for p in prompts[:6]) and prompts[6].images[1] is big  # one object per file
    assert big.width * big.height <= 12544 and big.width % 28 == 0 and big.height % 28 == 0
    assert store.count == 2 and store.nbytes == 3 * (big.width * big.height + 56 * 84)
    # fitted once: the trainer's resize at encoding time leaves it as it is (same pixels as resizing the original)
    from PIL import Image

    original = Image.open(tmp_path / "big.png").convert("RGB")
    assert resize_image(big, 3136, 12544, 14).tobytes() == big.tobytes()
    assert resize_image(original, 3136, 12544, 14).tobytes() == big.tobytes()


def test_an_image_file_over_the_size_cap_is_refused_before_it_is_read(tmp_path, monkeypatch):
    from mm_gmpo.data import images
    from mm_gmpo.data.images import MAX_FILE_BYTES, read_image_file
    from mm_gmpo.data.prompts import DataError

    sparse = tmp_path / "huge.png"
    with open(sparse, "wb") as f:  # 1.5 GiB on paper, nothing on disk; a PNG signature in front
        f.write(_png()[:64])
        f.truncate(3 * 2**29)
    assert MAX_FILE_BYTES < 3 * 2**29
    opened = []
    monkeypatch.setattr(images.os, "open", lambda *a, **k: opened.append(a) or os.open(*a, **k))
    with pytest.raises(DataError, match=r"huge\.png has 1536 MiB, over the 128 MiB cap"):
        read_image_file(sparse, "row 1: field 'images'")
    assert opened == []  # refused on its size, never opened
    with pytest.raises(DataError, match="image bytes, over the 128 MiB cap"):
        images.decode_image(b"\0" * (MAX_FILE_BYTES + 1), "row 1")


# ---------------------------------------------------------------- 9. bad rows: one DataError each, no hang


def _bad_rows(tmp_path: Path) -> dict[str, tuple[str, str]]:
    """name -> (jsonl line, words the DataError must hold)."""
    (tmp_path / "ok.png").write_bytes(_png())
    (tmp_path / "locked.png").write_bytes(_png())
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    row = lambda images, answer="1": json.dumps({"problem": "p", "answer": answer, "images": images})  # noqa: E731
    return {
        "base64_text": (row({"bytes": "iVBORw0KGgo=", "path": None}), "'bytes' holds a str, expected raw image "
                                                                      "bytes (base64 text?"),
        "path_number": (row({"path": 5}), "'path' holds a int, expected a file path"),
        "deep_json": ("[" * 100_000 + "]" * 100_000, "JSON nested too deeply"),
        "proc_mem": (row(["/proc/self/mem"]), "/proc/self/mem is empty"),
        "proc_kmsg": (row(["/proc/kmsg"]), "/proc/kmsg"),
        "fifo": (row([str(fifo)]), "fifo.png is not a regular file"),
        "unreadable": (row(["locked.png"]), "locked.png cannot be read (Permission denied)"),
        "nan_answer": ('{"problem": "p", "answer": NaN}', "field 'answer' is nan, not a ground truth"),
        "inf_answer": ('{"problem": "p", "answer": Infinity}', "field 'answer' is inf, not a ground truth"),
        "nul_in_path": (row(["a\u0000b.png"]), "is not a file path"),
    }


BAD = ["base64_text", "path_number", "deep_json", "proc_mem", "proc_kmsg", "fifo", "unreadable", "nan_answer",
       "inf_answer", "nul_in_path"]


@pytest.mark.parametrize("case", BAD)
def test_every_bad_row_is_one_data_error_naming_file_row_and_field_and_skippable(tmp_path, monkeypatch, case):
    import errno

    from mm_gmpo.data import images
    from mm_gmpo.data.files import load_file_prompts
    from mm_gmpo.data.prompts import DataError

    line, words = _bad_rows(tmp_path)[case]
    real_open = os.open

    def deny(path, *a, **k):  # a file this user may not read (the suite may run as root, who reads anything)
        if str(path).endswith("locked.png"):
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_open(path, *a, **k)

    monkeypatch.setattr(images.os, "open", deny)
    f = tmp_path / "d.jsonl"
    good = json.dumps({"problem": "fine", "answer": "1", "images": ["ok.png"]})
    f.write_text(good + "\n" + line + "\n")
    with pytest.raises(DataError) as e:
        load_file_prompts(str(f))
    assert f"{f} line 2" in str(e.value) and words in str(e.value), str(e.value)
    if case not in ("deep_json", "nan_answer", "inf_answer"):
        assert "field 'images'" in str(e.value)
    with pytest.warns(UserWarning, match="skipped 1 bad sample"):
        assert len(load_file_prompts(str(f), on_bad_sample="skip")) == 1


def test_base64_text_in_a_parquet_image_column_is_a_data_error(tmp_path):
    import datasets

    from mm_gmpo.data.files import load_file_prompts
    from mm_gmpo.data.prompts import DataError

    rows = [{"problem": "p", "answer": "1", "images": [{"bytes": "iVBORw0KGgo=", "path": None}]}]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    with pytest.raises(DataError, match=r"d\.parquet row 0: field 'images': 'bytes' holds a str"):
        load_file_prompts(str(tmp_path / "d.parquet"))


# ---------------------------------------------------------------- 3, 4. runs that silently mix or lose work


def _earlier_run(out: Path, steps=(1, 2), logged: int = 2) -> None:
    for s in steps:
        (out / "checkpoints" / f"step_{s:08d}").mkdir(parents=True)
        (out / "checkpoints" / f"step_{s:08d}" / "trainer_state.json").write_text("{}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").write_text("".join(json.dumps({"step": i + 1}) + "\n" for i in range(logged)))


def test_a_new_run_over_an_earlier_one_is_refused_unless_overwrite_moves_it_aside(tmp_path, capsys):
    from mm_gmpo.config import ConfigError
    from mm_gmpo.run_folder import earlier_run, start_or_continue

    out = tmp_path / "run"
    _earlier_run(out)
    with pytest.raises(ConfigError, match=r"trainer.resume=none: .* holds an earlier run \(checkpoints step_00000001, "
                                          r"step_00000002, 2 logged step\(s\)\).*trainer.resume=auto.*"
                                          r"trainer.overwrite=true"):
        start_or_continue(out, "none", overwrite=False)
    start_or_continue(out, "auto", overwrite=False)  # continuing it is fine
    assert earlier_run(out) == (["step_00000001", "step_00000002"], 2)  # nothing touched
    start_or_continue(out, "none", overwrite=True)
    aside = next(out.glob("replaced_*"))
    assert earlier_run(out) == ([], 0) and earlier_run(aside) == (["step_00000001", "step_00000002"], 2)
    assert "was moved to" in capsys.readouterr().out
    # logged steps but no checkpoint (a run stopped before its first save): auto would append to its log
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(ConfigError, match=r"resume=auto: .*no checkpoint, 1 logged step\(s\)\) with nothing to "
                                          r"resume from"):
        start_or_continue(out, "auto", overwrite=False)
    start_or_continue(tmp_path / "fresh", "none", overwrite=False)


def test_every_checkpoint_damaged_is_refused_not_a_fresh_run_on_top(tmp_path):
    from types import SimpleNamespace

    from mm_gmpo.checkpointer import Checkpointer
    from mm_gmpo.config import Config, ConfigError

    _earlier_run(tmp_path / "run")  # trainer_state.json without model_optim / manifest: damaged
    for p in (tmp_path / "run" / "checkpoints").iterdir():
        (p / "manifest.json").write_text(json.dumps({"trainer_state.json": [2, "0" * 64], "model_optim/x": [1, ""]}))
    c = Checkpointer(Config(), tmp_path / "run", SimpleNamespace(is_main=True), None, None, None)
    with pytest.raises(ConfigError, match=r"every checkpoint in .* is damaged \(step_00000002: missing"):
        c._resume_from()


def test_a_copy_of_a_checkpoint_under_another_name_is_ignored_and_reported(tmp_path):
    import shutil

    from mm_gmpo.checkpoint import TrainerState, foreign_entries, resume_point, save_checkpoint

    policy = _tiny_policy()
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, policy, None, None, TrainerState(step=step), keep_last=2)
    shutil.copytree(tmp_path / "step_00000003", tmp_path / "step_00000003_backup")
    shutil.copytree(tmp_path / "step_00000002", tmp_path / "step_x")
    (tmp_path / "notes.txt").write_text("mine")
    assert resume_point(tmp_path) == (tmp_path / "step_00000003", [])
    assert foreign_entries(tmp_path) == ["notes.txt", "step_00000003_backup", "step_x"]
    save_checkpoint(tmp_path, policy, None, None, TrainerState(step=4), keep_last=1)  # keep_last spares them
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [
        "latest", "notes.txt", "step_00000003_backup", "step_00000004", "step_x"]


# ---------------------------------------------------------------- 5. evaluation folders and arguments


def _eval_cli(monkeypatch, capsys, *args):
    """scripts/eval_math.py on AIME 2024 (30 problems) in this process with the oracle backend (no model), ->
    (exit code, stdout, stderr); both eval scripts share these arguments and folders (mm_gmpo.evaluation)."""
    import runpy

    monkeypatch.setattr("sys.argv", ["eval_math.py", "--dataset", "aime2024", "--model", "tiny-random", "--backend",
                                     "oracle", *args])
    code = 0
    try:
        runpy.run_path(str(ROOT / "scripts" / "eval_math.py"), run_name="__main__")
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("args, words", [(["--limit", "-1"], "--limit: -1 is below 0"),
                                         (["--batch-size", "0"], "--batch-size: 0 is below 1"),
                                         (["--n", "0"], "--n: 0 is below 1"),
                                         (["--max-tokens", "0"], "--max-tokens: 0 is below 1")])
def test_eval_arguments_out_of_range_stop_with_exit_2(tmp_path, monkeypatch, capsys, args, words):
    monkeypatch.chdir(tmp_path)
    code, _, err = _eval_cli(monkeypatch, capsys, *args)
    assert code == 2 and words in err and "Traceback" not in err
    assert not (tmp_path / "eval_out").exists()


def test_eval_never_overwrites_another_runs_results_or_counts_a_half_done_problem(tmp_path, monkeypatch, capsys):
    out = tmp_path / "ev"
    out.mkdir()
    (out / "results.json").write_text('{"accuracy": 0.5}')  # another run's report, no settings.json
    code, _, err = _eval_cli(monkeypatch, capsys, "--limit", "3", "--out", str(out))
    assert code == 2 and "holds results.json without a settings.json" in err
    assert (out / "results.json").read_text() == '{"accuracy": 0.5}'
    code, _, _ = _eval_cli(monkeypatch, capsys, "--limit", "3", "--n", "2", "--out", str(out), "--overwrite")
    assert code == 0
    rows = [json.loads(x) for x in (out / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == 6
    # killed mid-problem: the last problem has 1 of its 2 samples
    (out / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:5]))
    code, _, _ = _eval_cli(monkeypatch, capsys, "--limit", "3", "--n", "2", "--out", str(out))
    assert code == 0
    again = [json.loads(x) for x in (out / "generations.jsonl").read_text().splitlines()]
    by_id = {}
    for r in again:
        by_id.setdefault(r["id"], []).append(r["sample"])
    assert len(by_id) == 3 and all(sorted(s) == [0, 1] for s in by_id.values())  # redone whole, not counted done
    report = json.loads((out / "results.json").read_text())
    assert report["k"] == 2 and report["n_samples"] == 6 and report["n_problems"] == 3


# ---------------------------------------------------------------- 6, 12. configs: one line, exit 2, --check too


def _train_cli(monkeypatch, capsys, *args):
    """scripts/train_mm.py --check in this process -> (exit code, stderr)."""
    import runpy
    import sys

    monkeypatch.setattr(sys, "argv", ["train_mm.py", *args])
    try:
        runpy.run_path(str(ROOT / "scripts" / "train_mm.py"), run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path, monkeypatch, capsys):
    import time

    lines = ["algorithm:", "  reward_kwargs:", "    a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"    a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]  # 10**9 strings
    bomb = tmp_path / "bomb.yaml"  # reward_kwargs takes any keys: before, --check expanded it and passed
    bomb.write_text("\n".join(lines) + "\n")
    assert bomb.stat().st_size < 1000
    t0 = time.perf_counter()
    code, err = _train_cli(monkeypatch, capsys, "--config", str(bomb), "--check")
    assert time.perf_counter() - t0 < 5  # refused while parsing, nothing expanded (it took 18 s at depth 6)
    assert code == 2 and err.strip().splitlines() == [
        f"config error: {bomb}: line 4: the alias *a0 is not allowed in a config (aliases can expand without "
        "bound); write the value out"]
    code, err = _train_cli(monkeypatch, capsys, "--check", "algorithm.reward_kwargs={x: &y [1], z: *y}")
    assert code == 2 and "the alias *y is not allowed" in err


@pytest.mark.parametrize("case", ["max_pixels", "min_pixels", "seed", "output_dir_file", "output_dir_locked",
                                  "long_name", "long_data_name", "non_utf8", "config_folder", "int_key"])
def test_each_bad_setting_is_one_line_exit_2_also_under_check(tmp_path, monkeypatch, capsys, case):
    from mm_gmpo import config

    (tmp_path / "afile").write_text("x")
    args = {"max_pixels": ["data.min_pixels=0", "data.max_pixels=0"], "min_pixels": ["data.min_pixels=-5"],
            "seed": [f"trainer.seed={2**64}"],
            "output_dir_file": [f"trainer.output_dir={tmp_path / 'afile' / 'run'}"],
            "output_dir_locked": [f"trainer.output_dir={tmp_path / 'locked' / 'run'}"],
            "long_name": [f"trainer.output_dir={tmp_path / ('x' * 256)}"],
            "long_data_name": ["data.dataset=files", "trainer.eval_every=0", f"data.train_files={tmp_path / ('d' * 300)}.jsonl"],
            "non_utf8": ["--config", str(tmp_path / "latin1.yaml")],
            "config_folder": ["--config", str(tmp_path)],
            "int_key": ["algorithm.reward_kwargs={1: a, b: 2}"]}[case]
    words = {"max_pixels": "data.min_pixels = 0, data.max_pixels = 0: pixel budgets must be >= 1",
             "min_pixels": "data.min_pixels = -5", "seed": "trainer.seed = 18446744073709551616: must be within",
             "output_dir_file": "afile is a file, not a folder", "output_dir_locked": "locked is not writable",
             "long_name": "trainer.output_dir: the name xxxx", "long_data_name": "data.train_files: the name dddd",
             "non_utf8": "latin1.yaml: not UTF-8 text", "config_folder": "is a folder; name a .yaml file",
             "int_key": "algorithm.reward_kwargs: the key 1 is a int"}[case]
    (tmp_path / "latin1.yaml").write_bytes("trainer:\n  output_dir: caf\u00e9\n".encode("latin-1"))
    (tmp_path / "locked").mkdir()
    real_access = os.access
    monkeypatch.setattr(config.os, "access", lambda p, mode: False if str(p).endswith("locked")
                        else real_access(p, mode))  # root writes anywhere: the check itself is what is tested
    monkeypatch.chdir(tmp_path)
    for check in (["--check"], []):
        code, err = _train_cli(monkeypatch, capsys, *check, *args)
        assert code == 2 and len(err.strip().splitlines()) == 1 and words in err, (check, err[-1500:])
        assert "Traceback" not in err


# ---------------------------------------------------------------- 11. reward_kwargs through a resume


def test_reward_kwargs_that_yaml_would_turn_into_dates_or_nan_compare_equal_after_a_checkpoint(tmp_path):
    from mm_gmpo.config import config_changes, load_config, to_dict

    (tmp_path / "c.yaml").write_text("algorithm:\n  reward_kwargs: {since: 2024-01-01, tol: .nan, cap: .inf, "
                                     "tags: [a, b]}\n")
    cfg = load_config(tmp_path / "c.yaml")
    assert cfg.algorithm.reward_kwargs["since"] == "2024-01-01"  # text, not a date
    stored = json.loads(json.dumps({"config": to_dict(cfg)}, default=str))["config"]  # as trainer_state.json holds it
    assert config_changes(stored, to_dict(load_config(tmp_path / "c.yaml"))) == ([], [])
    changed = to_dict(load_config(tmp_path / "c.yaml", ["algorithm.reward_kwargs.tol=0.5"]))
    assert config_changes(stored, changed)[0] == ["algorithm.reward_kwargs: {'since': '2024-01-01', 'tol': 'nan', "
                                                  "'cap': 'inf', 'tags': ['a', 'b']} -> {'since': '2024-01-01', "
                                                  "'tol': 0.5, 'cap': 'inf', 'tags': ['a', 'b']}"]


# ---------------------------------------------------------------- 8. rewards: hard limits, float32 range, exits


def _reward_file(tmp_path: Path, body: str) -> str:
    (tmp_path / "rw.py").write_text("import os\n\ndef compute_score(response, ground_truth, **kw):\n" + body)
    return f"{tmp_path / 'rw.py'}:compute_score"


def test_a_reward_function_never_runs_in_the_trainer_process():
    from mm_gmpo.config import ConfigError, load_config, validate

    cfg = load_config(ROOT / "configs" / "colors_own_data.yaml", ["trainer.reward_workers=0"])
    with pytest.raises(ConfigError, match=r"trainer.reward_workers = 0 would run algorithm.reward_function inside "
                                          r"the trainer.*set trainer.reward_workers=1"):
        validate(cfg)
    validate(load_config(ROOT / "configs" / "colors_own_data.yaml"))  # the example runs it in a worker
    validate(load_config(None, ["trainer.reward_workers=0"]))  # built-in verifiers may score in-process


def test_a_reward_past_float32s_range_scores_zero_as_an_error(tmp_path):
    from mm_gmpo.rewards.batch import score_batch
    from mm_gmpo.rewards.custom import RewardFunction, RewardFunctionError, probe

    rf = RewardFunction(_reward_file(tmp_path, "    return 1e39 if 'big' in response else {'overall': 1.0, "
                                               "'extra': -1e300 if response == 'neg' else 0.5}\n"))
    with pytest.warns(UserWarning, match=r"rw\.py:compute_score: 2 of 3 items scored 0 \(first: "
                                         r"RewardFunctionError: rw\.py:compute_score returned overall=1e\+39"):
        scores, metrics = score_batch(["big", "ok", "neg"], ["x"] * 3, task="math", reward_function=rf, workers=0)
    assert [s["overall"] for s in scores] == [0.0, 1.0, 0.0]
    assert metrics["reward/errors"] == 2.0 and metrics["reward/overall"] == pytest.approx(1 / 3)
    assert all(np.isfinite(np.float32(v)) for v in metrics.values())
    with pytest.raises(RewardFunctionError, match="returned overall=1e\\+39; expected a finite float within "
                                                  "float32's range"):
        probe(rf, "big")


@pytest.mark.slow
def test_a_reward_worker_stuck_in_c_code_is_killed_and_one_that_exits_stops_the_run_naming_it(tmp_path):
    from mm_gmpo.rewards.batch import score_batch
    from mm_gmpo.rewards.custom import RewardFunction, RewardFunctionError

    stuck = RewardFunction(_reward_file(tmp_path, "    return float(sum(range(10**13))) if response == 'stuck' "
                                                  "else 1.0\n"), timeout_s=1.0)
    with pytest.warns(UserWarning, match="1 of 2 items scored 0"):
        scores, metrics = score_batch(["stuck", "ok"], ["x", "x"], task="math", reward_function=stuck, workers=1)
    assert [s["overall"] for s in scores] == [0.0, 1.0] and metrics["reward/killed_for_time"] == 1.0
    (tmp_path / "ex").mkdir()
    exits = RewardFunction(_reward_file(tmp_path / "ex", "    os._exit(3)\n"))
    with pytest.raises(RewardFunctionError, match=r"algorithm.reward_function: .*ex/rw\.py:compute_score ended its "
                                                  r"reward worker process \(exit code 3"):
        score_batch(["a", "b"], ["x", "x"], task="math", reward_function=exits, workers=1)


@pytest.mark.slow
def test_a_probe_stuck_in_c_code_ends_the_process_pointing_at_the_function(tmp_path):
    import subprocess
    import sys
    import time

    spec = _reward_file(tmp_path, "    return float(sum(range(10**13)))\n")
    code = ("import sys; sys.path.insert(0, sys.argv[1])\n"
            "from mm_gmpo.rewards.custom import RewardFunction, probe\n"
            "probe(RewardFunction(sys.argv[2], timeout_s=1.0), '1')\n")
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", code, str(ROOT), spec], capture_output=True, text=True, timeout=120)
    assert time.perf_counter() - t0 < 60  # 2 x 1 s + 5 s, then faulthandler ends it (it would run for hours)
    assert r.returncode != 0 and "Timeout" in r.stderr and "rw.py\", line 4 in compute_score" in r.stderr, r.stderr
