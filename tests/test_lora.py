"""LoRA (model.lora): only adapters train; whatever leaves the trainer (weight sync, HF export) is the merged model
W + scaling * B @ A; checkpoints hold the adapters and resume exactly under FSDP2 on 2 gloo ranks."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mm_gmpo.lora import add_lora, lora_scalings, merge_lora
from mm_gmpo.models import build_model, tiny_qwen2_5_vl_config
from mm_gmpo.policy import Policy, collate

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def lora_model(dtype=torch.float32, vision=False, seed=0):
    m = build_model("t", random_init=True, config=tiny_qwen2_5_vl_config(), dtype=dtype, seed=seed)
    add_lora(m, rank=4, alpha=8, vision=vision)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # B = 0 at start (the model is unchanged): give the adapters something to merge
        for n, p in m.named_parameters():
            if ".lora_B." in n:
                p.copy_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return m


def image_batch():
    from mm_gmpo.data.processing import encode_prompts, load_processor
    from mm_gmpo.data.synthetic import synthetic_prompts

    enc, _ = encode_prompts(synthetic_prompts(3, seed=0), load_processor(), max_prompt_length=512, min_pixels=3136,
                            max_pixels=12544)
    g = torch.Generator().manual_seed(0)
    resp = [torch.randint(0, 151000, (n,), generator=g).tolist() for n in (4, 9, 6)]
    return collate([e.input_ids for e in enc], resp, pad_id=151643, pixel_values=[e.pixel_values for e in enc],
                   image_grid_thw=[e.image_grid_thw for e in enc])


def test_only_adapters_train_and_the_vision_tower_is_excluded_by_default():
    from mm_gmpo.optim import build_optimizer

    m = lora_model()
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert not any(".visual." in n for n in trainable)
    assert len(lora_scalings(m)) == 2 * 7 and set(lora_scalings(m).values()) == {2.0}  # 2 layers x 7 linears
    opt = build_optimizer(Policy(m), lr=1e-3)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(trainable)
    with_vision = lora_model(vision=True)
    assert len(lora_scalings(with_vision)) == 2 * 7 + 2 * 5  # + 2 vision blocks x (qkv, proj, 3 MLP)


def test_modules_to_save_train_in_full_under_their_own_names():
    m = build_model("t", random_init=True, config=tiny_qwen2_5_vl_config(), dtype=torch.float32, seed=0)
    add_lora(m, rank=4, alpha=8, modules_to_save=["model.language_model.norm"])
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert "model.language_model.norm.weight" in trainable
    assert {n for n in trainable if ".lora_" not in n} == {"model.language_model.norm.weight"}
    merged = dict(merge_lora(((n, p.detach()) for n, p in m.named_parameters()), lora_scalings(m)))
    assert torch.equal(merged["model.language_model.norm.weight"], m.model.language_model.norm.weight)
    fresh = build_model("t", random_init=True, config=tiny_qwen2_5_vl_config(), dtype=torch.float32, seed=0)
    with pytest.raises(ValueError, match=r"no module is named \['model\.nope'\]"):
        add_lora(fresh, rank=4, alpha=8, modules_to_save=["model.nope"])


@pytest.mark.parametrize("vision", [False, True])
def test_merged_weights_are_base_plus_scaled_adapter_product(vision):
    m = lora_model(vision=vision)
    params = dict(m.named_parameters())
    merged = dict(merge_lora(((n, p.detach()) for n, p in m.named_parameters()), lora_scalings(m)))
    plain = build_model("t", random_init=True, config=tiny_qwen2_5_vl_config(), dtype=torch.float32, seed=0)
    assert set(merged) == {n for n, _ in plain.named_parameters()}
    for layer, s in lora_scalings(m).items():
        ref = (params[f"{layer}.base_layer.weight"].double()
               + s * params[f"{layer}.lora_B.default.weight"].double() @ params[f"{layer}.lora_A.default.weight"].double())
        torch.testing.assert_close(merged[f"{layer}.weight"].double(), ref, rtol=0, atol=1e-6)
        assert (merged[f"{layer}.weight"] - params[f"{layer}.base_layer.weight"]).abs().max() > 1e-3
    # the plain model with the merged weights computes what the adapted model computes
    plain.load_state_dict(merged, strict=False)
    b = image_batch()
    with torch.no_grad():
        torch.testing.assert_close(Policy(plain)(b)[0], Policy(m)(b)[0], rtol=0, atol=2e-5)


def test_weight_sync_sends_merged_weights_to_the_hf_engine():
    from mm_gmpo.data.processing import load_processor
    from mm_gmpo.rollout.hf import HFEngine
    from mm_gmpo.weight_sync import sync_weights

    m = lora_model()
    other = build_model("t", random_init=True, config=tiny_qwen2_5_vl_config(), dtype=torch.float32, seed=5)
    engine = HFEngine(other, load_processor().tokenizer)
    b = image_batch()
    metrics = sync_weights(Policy(m), engine)  # the engine rejects unknown names and stale ones
    assert metrics["perf/weight_sync_tensors"] == len(list(other.parameters()))
    with torch.no_grad():
        torch.testing.assert_close(Policy(other)(b)[0], Policy(m)(b)[0], rtol=0, atol=2e-5)


def test_export_writes_merged_weights_and_a_peft_adapter(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from mm_gmpo.checkpoint import export_hf

    m = lora_model()
    export_hf(Policy(m), tmp_path / "hf")
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    merged = dict(merge_lora(((n, p.detach()) for n, p in m.named_parameters()), lora_scalings(m)))
    for n, p in loaded.named_parameters():
        torch.testing.assert_close(p, merged[n], rtol=0, atol=0)
    base = build_model("t", random_init=True, config=tiny_qwen2_5_vl_config(), dtype=torch.float32, seed=0)
    peft_merged = PeftModel.from_pretrained(base, tmp_path / "hf" / "adapter").merge_and_unload()
    for n, p in peft_merged.named_parameters():
        torch.testing.assert_close(p, merged[n], rtol=0, atol=1e-6)


def train(out: Path, steps: int, *extra: str) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "scripts" / "train_mm.py"), f"trainer.output_dir={out}", f"trainer.total_steps={steps}",
           "trainer.rollout_batch_size=4", "trainer.mini_batch_size=2", "rollout.n=4", "trainer.save_every=2",
           "trainer.eval_every=0", "model.lora.rank=4", "optim.lr=1e-2", *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=ENV, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "LoRA rank 4: 14 linear layers" in r.stdout
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_fsdp2_lora_run_checkpoints_adapters_and_resumes_exactly(tmp_path):
    import torch.distributed.checkpoint as dcp
    from transformers import AutoModelForImageTextToText

    full = tmp_path / "full"
    rows = train(full, 4)
    assert all(r["rollout/logprob_diff_max"] < 1e-4 for r in rows)  # the engine samples from the merged model
    ckpt = full / "checkpoints" / "step_00000004" / "model_optim"
    keys = [k for k in dcp.FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata if k.startswith("model.")]
    assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys)  # adapters only, no frozen base
    assert sum(f.stat().st_size for f in ckpt.iterdir()) < 2_000_000
    # the HF export is the merged model: it reloads and changed from the initial weights in the adapted layers
    init = build_model("t", random_init=True, config=tiny_qwen2_5_vl_config(), dtype=torch.float32, seed=1)
    final = AutoModelForImageTextToText.from_pretrained(full / "hf_export", dtype=torch.float32).state_dict()
    changed = {n for n, p in init.named_parameters() if not torch.equal(p, final[n])}
    assert changed and all(".layers." in n and n.endswith("_proj.weight") for n in changed)
    assert (full / "hf_export" / "adapter" / "adapter_model.safetensors").exists()
    # resume from step 2 (the base weights come from model.path again): steps 3 and 4 exactly as before
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    for name in ("step_00000004", ):
        shutil.rmtree(resumed / "checkpoints" / name)
    again = train(resumed, 4)
    drop = ("time", "timing/", "perf/")
    strip = [{k: v for k, v in r.items() if not k.startswith(drop)} for r in again]
    assert strip == [{k: v for k, v in r.items() if not k.startswith(drop)} for r in rows]
