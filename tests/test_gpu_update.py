"""The update's GPU paths on a CUDA device: packed micro-batches (one flash/efficient SDPA call per sequence), grouped
vision attention and compiled MLPs/norms against the padded, per-window, eager paths and a float64 CPU reference.

Skipped without a GPU. ``MM_GMPO_GPU_TESTS_ON_CPU=1`` runs the same code on the CPU (plumbing only: the CPU
kernels are not the ones these tests are for).
"""

import os
from dataclasses import replace

import pytest
import torch

from mm_gmpo.attention import use_grouped_vision_attention
from mm_gmpo.models import build_model, compile_blocks, tiny_qwen2_5_vl_config
from mm_gmpo.policy import Policy, collate

ON_CPU = os.environ.get("MM_GMPO_GPU_TESTS_ON_CPU") == "1"
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not (torch.cuda.is_available() or ON_CPU), reason="needs a CUDA GPU")]
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def full_fp32():
    """float32 means float32 here: no TF32 in matmuls or cuDNN convolutions (the patch embedding)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def batch(n_seq: int = 6):
    """n_seq sequences of uneven lengths, pairs sharing an image (one vision pass each), 16 x 16 patches."""
    g = torch.Generator().manual_seed(0)
    ids, resp, pvs = [], [], []
    for i in range(n_seq):
        if i % 2 == 0:
            pv = torch.randn(64, 1176, generator=g)
        ids.append([151644, 151652] + [151655] * 16 + [151653] + torch.randint(0, 150000, (3 + 7 * i,), generator=g).tolist())
        resp.append(torch.randint(0, 150000, (5 + 11 * i,), generator=g).tolist())
        pvs.append(pv)
    return collate(ids, resp, pad_id=151643, pixel_values=pvs, image_grid_thw=[torch.tensor([[1, 8, 8]])] * n_seq)


def model(dtype, *, grouped=False, compiled=False):
    cfg = tiny_qwen2_5_vl_config(hidden_size=128, layers=2, vision_depth=2)
    m = build_model("t", random_init=True, config=cfg, dtype=torch.float32, attn_implementation="sdpa", seed=0)
    m.to(dtype)  # the same weights in every dtype
    if grouped:
        use_grouped_vision_attention(m)
    if compiled:
        compile_blocks(m)
    return m


def logprobs_and_grads(m, b, device, *, packed, w):
    m.to(device).zero_grad()
    b = replace(b, pixel_values=b.pixel_values.to(next(m.parameters()).dtype)).to(device)
    lp, _ = Policy(m, chunk_size=16, packed=packed)(b)
    (lp.double() * w.to(device)).sum().backward()
    grads = {n: p.grad.detach().double().cpu() for n, p in m.named_parameters() if p.grad is not None}
    return lp.detach().double().cpu(), grads


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def reference():
    b = batch()
    w = torch.randn(b.response_mask.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    lp, grads = logprobs_and_grads(model(torch.float64), b, torch.device("cpu"), packed=False, w=w)
    return b, w, lp, grads


@pytest.mark.parametrize("packed,grouped,compiled", [(False, False, False), (True, False, False),
                                                     (True, True, False), (True, True, True)])
def test_fp32_paths_match_the_float64_reference(reference, packed, grouped, compiled):
    b, w, ref_lp, ref_g = reference
    lp, g = logprobs_and_grads(model(torch.float32, grouped=grouped, compiled=compiled), b, DEVICE, packed=packed, w=w)
    assert (lp - ref_lp).abs().max().item() < 1e-4
    assert set(g) == set(ref_g)
    worst = max(rel(g[n], ref_g[n]) for n in g if ref_g[n].norm() > 0)
    assert worst < 1e-3, worst


def test_bf16_packed_is_as_close_to_the_reference_as_padded(reference):
    """bf16 compute: the packed layout (per-sequence causal SDPA: the flash kernel on a GPU) lands as close to the
    float64 reference as the padded one (transformers' SDPA with its mask)."""
    b, w, ref_lp, _ = reference
    errs = {}
    for packed in (False, True):
        lp, _ = logprobs_and_grads(model(torch.bfloat16, grouped=True), b, DEVICE, packed=packed, w=w)
        mask = b.response_mask.bool()
        errs[packed] = (lp - ref_lp)[mask].abs().mean().item()
    assert errs[True] < 1.5 * errs[False] + 1e-3, errs
    assert errs[True] < 0.1, errs


@pytest.mark.skipif(not torch.cuda.is_available(), reason="page-locked memory needs CUDA")
def test_pinned_pixels_stay_pinned_through_select_and_copy_asynchronously():
    """The trainer pins a step's pixels once on a GPU: sub-batches cut from them (a view for whole groups, one
    gathered copy for mixed ones) are still page-locked, so their non-blocking transfers are asynchronous, and
    the copies arrive intact."""
    pa, pb = torch.randn(16, 1176), torch.randn(4, 1176)
    grid_a, grid_b = torch.tensor([[1, 4, 4]]), torch.tensor([[1, 2, 2]])
    b = collate([[1, 151655, 2]] * 2 + [[7, 151655]] * 2, [[4], [5], [8], [9]], pad_id=0,
                pixel_values=[pa, pa, pb, pb], image_grid_thw=[grid_a, grid_a, grid_b, grid_b]).pin_memory()
    assert b.pixel_values.is_pinned()
    for idx in ([2, 3], [3, 0, 1]):
        sub = b.select(idx)
        assert sub.pixel_values.is_pinned()
        on_gpu = sub.to(torch.device("cuda"))
        torch.cuda.synchronize()
        assert torch.equal(on_gpu.pixel_values.cpu(), sub.pixel_values)
