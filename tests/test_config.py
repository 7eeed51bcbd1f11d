"""Config: YAML + dotted overrides, strict keys and types, cross-field checks with actionable messages."""

from pathlib import Path

import pytest

from mm_gmpo.config import Config, ConfigError, dump_yaml, load_config, reference, validate

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_parses_and_validates(path):
    cfg = load_config(path)
    cpu_sized = path.name in ("tiny.yaml", "tiny_math.yaml", "tiny_video.yaml", "geo3k_smoke.yaml", "colors_own_data.yaml")
    validate(cfg, world_size=2 if cpu_sized else 8)


def test_paper_settings_in_configs():
    geo = load_config(CONFIGS[0].parent / "geo3k_qwen2_5_vl_7b_gmpo.yaml")
    assert (geo.model.path, geo.rollout.n, geo.optim.lr, geo.algorithm.clip_low, geo.algorithm.clip_high) == (
        "Qwen/Qwen2.5-VL-7B-Instruct", 5, 1e-6, 0.4, 0.4)
    assert geo.algorithm.kl_coef == 0.0 and geo.algorithm.objective == "gmpo"
    grpo = load_config(CONFIGS[0].parent / "geo3k_qwen2_5_vl_7b_grpo.yaml")
    assert grpo.algorithm.objective == "grpo" and grpo.algorithm.clip_low == 0.2
    assert grpo.model == geo.model and grpo.data == geo.data and grpo.rollout == geo.rollout  # a true twin
    math = load_config(CONFIGS[0].parent / "math_qwen2_5_math_7b_gmpo.yaml")
    assert (math.model.path, math.rollout.n, math.optim.lr, math.algorithm.kl_coef, math.rollout.max_tokens,
            math.data.levels, math.algorithm.format_weight) == ("Qwen/Qwen2.5-Math-7B", 8, 1e-6, 0.0, 3000, [3, 4, 5], 0.0)


def test_overrides_types_and_roundtrip(tmp_path):
    cfg = load_config(None, ["optim.lr=3e-6", "rollout.n=8", "data.levels=[3,4,5]", "model.freeze_vision=true",
                             "trainer.output_dir=runs/x"])
    assert cfg.optim.lr == 3e-6 and isinstance(cfg.optim.lr, float)
    assert cfg.rollout.n == 8 and cfg.data.levels == [3, 4, 5] and cfg.model.freeze_vision is True
    kw = load_config(None, ["algorithm.reward_kwargs={scale: 2, tag: x}", "rollout.allowed_tokens=[red,'no']"])
    assert kw.algorithm.reward_kwargs == {"scale": 2, "tag": "x"} and kw.rollout.allowed_tokens == ["red", "no"]
    with pytest.raises(ConfigError, match=r"algorithm\.reward_kwargs: expected dict, got 3"):
        load_config(None, ["algorithm.reward_kwargs=3"])
    f = tmp_path / "c.yaml"
    f.write_text(dump_yaml(cfg))
    assert load_config(f) == cfg
    assert load_config(None) == Config()


def test_override_beats_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  lr: 1e-6\nrollout:\n  n: 4\n")  # YAML 1.1 reads 1e-6 as a string: accepted as float
    cfg = load_config(f, ["rollout.n=6"])
    assert cfg.optim.lr == 1e-6 and cfg.rollout.n == 6


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["optim.lrr=1"], r"optim\.lrr: no such config key \(did you mean 'lr'\?\)"),
        (["nosection.x=1"], r"nosection: no such config key"),
        (["rollout.n=abc"], r"rollout\.n: expected int, got 'abc'"),
        (["model.freeze_vision=maybe"], r"model\.freeze_vision: expected bool"),
        (["optim=3"], r"optim: expected a mapping"),
        (["optim.lr"], r"expected key\.sub=value"),
    ],
)
def test_parse_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


@pytest.mark.parametrize(
    ("overrides", "world", "message"),
    [
        (["trainer.mini_batch_size=100"], 1, r"multiple of trainer\.mini_batch_size \(100\); e\.g\. set "
                                             r"trainer\.mini_batch_size=128"),
        (["rollout.n=3", "trainer.rollout_batch_size=2", "trainer.mini_batch_size=1"], 2, r"over 2 ranks"),
        (["trainer.rollout_batch_size=9", "trainer.mini_batch_size=3", "rollout.n=2"], 2, r"number of ranks \(2\)"),
        (["algorithm.objective=gmp"], 1, r"'gmp' is not one of gmpo, grpo, gspo, gspo_token, cispo, sapo "
                                         r"\(did you mean 'gmpo'\?\)"),
        (["algorithm.objective=gspo", "algorithm.clip_low=1.5"], 1, r"ratio epsilon in \(0, 1\), e\.g\. 0\.2 for "
                                                                     r"grpo, 3e-4 for gspo"),
        (["algorithm.objective=sapo", "algorithm.clip_high=0.2"], 1, r"algorithm\.clip_high = 0\.2: sapo has no "
                                                                      r"clip .*sapo_tau_pos"),
        (["algorithm.loss_agg=token_mean"], 1, r"loss_agg = token_mean: gmpo averages per sequence .* set it to auto"),
        (["algorithm.objective=cispo", "algorithm.clip_high=0"], 1, r"algorithm\.clip_high = 0\.0: must be > 0"),
        (["algorithm.objective=sapo", "algorithm.sapo_tau_neg=-1"], 1, r"sapo_tau_neg = 1\.0 / -1\.0: must be > 0"),
        (["algorithm.objective=grpo"], 1, r"ratio epsilon in \(0, 1\), e\.g\. 0\.2"),  # clip_low set to 1.5 below
        (["rollout.temperature=0"], 1, r"temperature must be > 0"),
        (["data.min_pixels=10", "data.max_pixels=5"], 1, r"data\.min_pixels \(10\) is larger"),
        (["rollout.backend=vllm", "rollout.sleep_level=3"], 1, r"rollout\.sleep_level=3: use 2"),
        (["trainer.save_every=-2"], 1, r"trainer\.save_every = -2: use N > 0 .* or -1 \(never\)"),
        (["data.dataset=files"], 1, r"data\.dataset=files needs data\.train_files: a \.jsonl"),
        (["data.dataset=files", "data.train_files=a.jsonl"], 1, r"needs data\.val_files; set it, or "
                                                                   r"trainer\.eval_every=0"),
        (["data.dataset=file"], 1, r"'file' is not one of files, geometry3k, math, synthetic, arithmetic, flashes \(did you mean"),
        (["data.task=maths"], 1, r"data\.task: 'maths' is not one of math, geometry3k, exact"),
        (["data.max_images=-1"], 1, r"data\.max_images = -1: must be >= 0"),
        (["algorithm.reward_function=my_reward.py"], 1, r"expected path/to/file\.py:function or "
                                                         r"package\.module:function"),
        (["algorithm.reward_type=batches"], 1, r"'batches' is not one of auto, batch, item"),
        (["algorithm.reward_timeout_s=0"], 1, r"reward_timeout_s = 0\.0: must be > 0"),
        (["rollout.allowed_tokens=[yes,no]"], 1, r"rollout\.allowed_tokens: \[True, False\] are not words; quote"),
    ],
)
def test_cross_field_errors_say_what_to_change(overrides, world, message):
    cfg = load_config(None, overrides)
    if overrides == ["algorithm.objective=grpo"]:
        cfg.algorithm.clip_low = 1.5
    with pytest.raises(ConfigError, match=message):
        validate(cfg, world_size=world)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("optim:\n  lr: fast\n")
    with pytest.raises(ConfigError, match=r"optim\.lr: expected float, got 'fast' \(str\) from .*wrong\.yaml"):
        load_config(wrong)


def test_every_field_documented():
    table = reference()
    for line in table.splitlines()[2:]:
        assert line.rstrip().endswith("|") and line.split("|")[3].strip(), line
    assert table.count("\n") > 50
