"""Model families (mm_gmpo.families): the bundled files and configs of Qwen2-VL, Qwen2.5-VL and Qwen3-VL (dense and
MoE) are the published ones, each family's processor gives the token counts its vision tower produces, sharded
loading reads every family (a mixture of experts' transposed expert tensors included), LoRA picks each family's
layers, vLLM gets a mixture of experts' weights under its own names, and an unsupported family stops in one line.
(Log-prob exactness per family: tests/test_multi_image.py; the real engine: tests/test_vllm_engine.py.)"""

import json

import pytest
import torch

from mm_gmpo.config import ConfigError
from mm_gmpo.data.processing import encode_prompt, load_processor
from mm_gmpo.data.synthetic import synthetic_prompts
from mm_gmpo.families import (
    ASSETS,
    QWEN2_5_VL,
    QWEN2_VL,
    QWEN3_VL,
    TINY_MODELS,
    UnsupportedModel,
    bundled_name,
    family_of,
    vllm_weights,
)
from mm_gmpo.models import (
    MODEL_CONFIGS,
    CheckpointSource,
    build_model,
    check_model_source,
    empty_model,
    model_config,
    processor_source,
    random_model_config,
)

TINY = list(TINY_MODELS)  # tiny-random (Qwen2.5-VL), then Qwen2-VL, Qwen3-VL, Qwen3-VL-MoE

# parameter counts of the published checkpoints (SOURCE.md of each bundled folder: safetensors totals / reports)
PUBLISHED_PARAMS = {"qwen3_vl_2b": 2_127_532_032, "qwen3_vl_4b": 4_437_815_808, "qwen3_vl_8b": 8_767_123_696,
                    "qwen3_vl_32b": 33_357_390_064, "qwen3_vl_30b_a3b": 31_070_754_032,
                    "qwen2_vl_2b": 2_208_985_600}


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_bundled_configs_build_the_published_models(name):
    model = empty_model(model_config(name), attn_implementation="sdpa")
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMS[name]
    assert family_of(model.config) is (QWEN2_VL if name.startswith("qwen2_vl") else QWEN3_VL)


def test_every_bundled_config_and_hub_id_resolves():
    assert {"qwen2_5_vl_3b", "qwen2_5_vl_7b", "qwen2_vl_2b", "qwen2_vl_7b", "qwen3_vl_2b", "qwen3_vl_4b",
            "qwen3_vl_8b", "qwen3_vl_32b", "qwen3_vl_30b_a3b"} == set(MODEL_CONFIGS)
    assert all(p.exists() for p in MODEL_CONFIGS.values())
    assert bundled_name("Qwen/Qwen3-VL-30B-A3B-Instruct") == "qwen3_vl_30b_a3b"
    assert bundled_name("Qwen/Qwen2-VL-7B-Instruct") == "qwen2_vl_7b"
    assert bundled_name("someone/else") is None
    q7 = model_config("qwen2_vl_7b")  # built here from the published values (assets/qwen2_vl/README.md)
    assert (q7.text_config.hidden_size, q7.text_config.num_hidden_layers, q7.vision_config.hidden_size) == (3584, 28, 3584)


@pytest.mark.parametrize("path", TINY)
def test_tiny_models_are_their_family_made_small(path):
    cfg = random_model_config(path)
    family = family_of(cfg)
    assert family is {"tiny-random": QWEN2_5_VL, "tiny-random-qwen2-vl": QWEN2_VL}.get(path, QWEN3_VL)
    text = cfg.text_config
    assert (text.hidden_size, text.num_hidden_layers, text.vocab_size) == (64, 2, 151936)
    assert cfg.image_token_id == 151655
    assert cfg.vision_config.patch_size == (16 if family is QWEN3_VL else 14)
    assert bool(getattr(text, "num_experts", 0)) == path.endswith("-moe")
    if family is QWEN3_VL:
        assert cfg.vision_config.deepstack_visual_indexes == [0]
        assert text.rope_parameters["mrope_interleaved"] is True


@pytest.mark.parametrize("path", TINY)
def test_each_family_processor_gives_the_token_counts_of_its_vision_tower(path):
    """Images resized to a multiple of patch x merge (28 or 32), not resized again by the processor; one
    <|image_pad|> per merged patch; Qwen3-VL's own template (no default system prompt, <think> tokens)."""
    proc = load_processor(processor_source(path))
    family = family_of(random_model_config(path))
    patch = 16 if family is QWEN3_VL else 14
    assert proc.image_processor.patch_size == patch and proc.image_processor.merge_size == 2
    for p in synthetic_prompts(3, seed=1):
        enc = encode_prompt(p, proc, min_pixels=3136, max_pixels=20_000)
        w, h = enc.images[0].size
        assert w % (2 * patch) == 0 and h % (2 * patch) == 0
        assert enc.image_grid_thw.tolist() == [[1, h // patch, w // patch]]
        assert enc.input_ids.count(151655) == (h // patch) * (w // patch) // 4
        assert enc.text.startswith("<|im_start|>user") == (family is QWEN3_VL)  # Qwen2/2.5-VL: a system prompt
    tok = proc.tokenizer
    if family is QWEN3_VL:
        assert tok.convert_tokens_to_ids(["<think>", "</think>"]) == [151667, 151668]
        assert list(proc.image_processor.image_mean) == [0.5, 0.5, 0.5]


@pytest.mark.parametrize("path", TINY[1:])
def test_sharded_loading_reads_every_family_as_from_pretrained(path, tmp_path):
    """Every parameter's rows, read from a saved checkpoint the way each rank reads its shard, equal
    from_pretrained's; a mixture of experts' fused expert tensors are stored transposed and read back in the
    model's layout, row (expert) slices included."""
    cfg = random_model_config(path)
    model = build_model("t", random_init=True, config=cfg, dtype=torch.float32, attn_implementation="sdpa", seed=3)
    model.save_pretrained(tmp_path)
    ref = dict(build_model(str(tmp_path), dtype=torch.float32, attn_implementation="sdpa").named_parameters())
    src = CheckpointSource(empty_model(model_config(str(tmp_path)), attn_implementation="sdpa"), tmp_path)
    assert set(src.where) == set(ref)
    for name, p in ref.items():
        assert torch.equal(src.read(name, slice(None)), p), name
        rows = slice(1, max(2, p.shape[0] // 2))
        assert torch.equal(src.read(name, rows), p[rows]), name
    if path.endswith("-moe"):
        from safetensors import safe_open

        with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
            key = "model.language_model.layers.0.mlp.experts.gate_up_proj"
            assert tuple(f.get_slice(key).get_shape()) == (4, 64, 64)  # (experts, hidden, 2 x 32): transposed
        assert set(src.swap) == {n for n in ref if ".experts." in n}


def test_lora_targets_each_familys_layers():
    from mm_gmpo.lora import add_lora, lora_scalings

    def adapted(path, **kw):
        m = build_model("t", random_init=True, config=random_model_config(path), dtype=torch.float32)
        add_lora(m, rank=2, alpha=4, **kw)
        return sorted(lora_scalings(m))

    dense = adapted("tiny-random-qwen3-vl", vision=True)
    assert len([n for n in dense if ".language_model." in n]) == 2 * 7
    assert {n.rsplit(".", 1)[1] for n in dense if ".visual." in n} == {"qkv", "proj", "linear_fc1", "linear_fc2"}
    moe = adapted("tiny-random-qwen3-vl-moe")
    assert {n.rsplit(".", 1)[1] for n in moe} == {"q_proj", "k_proj", "v_proj", "o_proj"} and len(moe) == 8
    q2 = adapted("tiny-random-qwen2-vl", vision=True)
    assert {n.rsplit(".", 1)[1] for n in q2 if ".visual." in n} == {"qkv", "proj", "fc1", "fc2"}
    assert adapted("tiny-random", target_modules=["q_proj"]) == [f"model.language_model.layers.{i}.self_attn.q_proj"
                                                                 for i in range(2)]


def test_vllm_gets_a_mixture_of_experts_one_expert_at_a_time():
    gate_up = torch.arange(2 * 6 * 3, dtype=torch.float32).reshape(2, 6, 3)  # (E, 2I, H), I = 3
    down = torch.arange(2 * 3 * 3, dtype=torch.float32).reshape(2, 3, 3)  # (E, H, I)
    other = torch.ones(2)
    out = dict(vllm_weights([("m.layers.0.mlp.experts.gate_up_proj", gate_up), ("m.layers.0.mlp.experts.down_proj", down),
                             ("m.layers.0.self_attn.q_proj.weight", other)]))
    assert torch.equal(out["m.layers.0.mlp.experts.1.gate_proj.weight"], gate_up[1, :3])
    assert torch.equal(out["m.layers.0.mlp.experts.1.up_proj.weight"], gate_up[1, 3:])
    assert torch.equal(out["m.layers.0.mlp.experts.0.down_proj.weight"], down[0])
    assert out["m.layers.0.self_attn.q_proj.weight"] is other and len(out) == 2 * 3 + 1


@pytest.mark.parametrize("model_type", ["qwen3_5", "qwen3_5_moe"])
def test_a_qwen3_5_model_stops_with_one_line(model_type, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type, "vision_config": {}}))
    with pytest.raises(ConfigError) as e:
        check_model_source(str(tmp_path))
    assert "\n" not in str(e.value) and "Qwen3.5" in str(e.value) and "not supported yet" in str(e.value)
    assert str(e.value).startswith("model.path: ")
    with pytest.raises(UnsupportedModel, match=r"Qwen3\.5"):
        family_of(type("C", (), {"model_type": model_type})())


def test_bundled_files_are_the_published_ones():
    """Byte counts of the files SOURCE.md lists (the hashes are in the READMEs; vocab/merges shared across families)."""
    sizes = {"qwen3_vl/tokenizer_config.json": 10868, "qwen3_vl/chat_template.json": 5499,
             "qwen3_vl/preprocessor_config.json": 390, "qwen3_vl/video_preprocessor_config.json": 385,
             "qwen3_vl/generation_config.json": 269, "qwen3_vl/configs/qwen3_vl_8b_instruct.json": 1474,
             "qwen3_vl/configs/qwen3_vl_30b_a3b_instruct.json": 1661, "qwen2_vl/preprocessor_config.json": 347,
             "qwen2_vl/configs/qwen2_vl_2b_instruct.json": 1196}
    assert {k: (ASSETS / k).stat().st_size for k in sizes} == sizes
    for fam in ("qwen2_vl", "qwen3_vl"):
        assert (ASSETS / fam / "vocab.json").read_bytes() == (ASSETS / "qwen2_5_vl" / "vocab.json").read_bytes()


def test_a_mixture_of_experts_counts_the_experts_a_token_uses_in_its_flops():
    from mm_gmpo.metrics import training_flops
    from mm_gmpo.policy import Policy

    policy = Policy(build_model("t", random_init=True, config=random_model_config("tiny-random-qwen3-vl-moe"),
                                dtype=torch.float32))
    params = dict(policy.named_parameters())
    vis = sum(p.numel() for n, p in params.items() if ".visual." in n)
    experts = sum(p.numel() for n, p in params.items() if ".mlp.experts." in n)
    embed = policy.model.get_input_embeddings().weight.numel()  # untied: a lookup, not a matmul
    dense = sum(p.numel() for p in params.values()) - vis - experts - embed
    assert experts > 0 and not policy.model.config.tie_word_embeddings
    assert training_flops(policy, 10, 4) == pytest.approx(6 * (dense + experts * 2 / 4) * 10 + 6 * vis * 4)


@pytest.mark.parametrize("path", TINY[1:])
def test_random_sharded_init_covers_every_family(path):
    """model.load=sharded with random weights (random:qwen3_vl_30b_a3b, ...): every parameter, the fused experts
    included, gets values of its shape, the same whatever rows are read first."""
    from mm_gmpo.models import RandomSource

    model = empty_model(random_model_config(path), attn_implementation="sdpa")
    src, again = RandomSource(model, seed=0), RandomSource(model, seed=0)
    for name, p in model.named_parameters():
        whole = src.read(name, slice(None))
        assert whole.shape == p.shape and torch.isfinite(whole).all(), name
        assert torch.equal(again.read(name, slice(p.shape[0] // 2, None)), whole[p.shape[0] // 2:]), name
    experts = [n for n, _ in model.named_parameters() if ".experts." in n]
    assert bool(experts) == path.endswith("-moe")
    assert all(src.read(n, slice(None)).std() > 0 for n in experts)  # initialised, not left at zero
