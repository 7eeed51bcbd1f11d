"""mm_gmpo/profiling.py on hand-made profiler events: what counts as an event's own device time, and categories."""

from types import SimpleNamespace as N

from mm_gmpo.profiling import _category, _own_device_us


def kernel(name, us):
    return N(name=name, device=0, duration=us)


def event(name, *, parent=None, annotation=False, kernels=(), is_async=False):
    return N(name=name, cpu_parent=parent, is_user_annotation=annotation, kernels=list(kernels), is_async=is_async)


def test_a_range_counts_the_kernels_it_launched_not_its_gpu_twin():
    # a record_function range (e.g. torch.compile's graph call) launches Triton kernels itself; its GPU-side twin
    # spans all kernels inside it, gaps included, and must not count
    rng = event("## Call CompiledFxGraph fx ##", annotation=True,
                kernels=[kernel("## Call CompiledFxGraph fx ##", 100.0), kernel("triton_poi_fused_mul_silu_0", 7.0)])
    assert _own_device_us(rng) == 7.0
    assert _own_device_us(event("aten::mm", kernels=[kernel("sm90_xmma_gemm", 5.0), kernel("splitk_reduce", 1.0)])) == 6.0
    assert _own_device_us(event("aten::mm", kernels=[kernel("k", 5.0)], is_async=True)) == 0.0


def test_categories_by_enclosing_region_then_name():
    opt = event("Optimizer.step#AdamW.step", annotation=True)
    fsdp = event("FSDP::all_gather_copy_in", annotation=True)
    assert _category(event("aten::_fused_adamw_", parent=opt)) == "optimizer"
    assert _category(event("aten::copy_", parent=event("aten::to", parent=fsdp))) == "FSDP gather/reduce"
    assert _category(event("c10d::_allgather_base_")) == "FSDP gather/reduce"
    assert _category(event("aten::mm", parent=event("aten::linear"))) == "matmul"
    assert _category(event("aten::_scaled_dot_product_flash_attention_backward")) == "attention"
    assert _category(event("## Call CompiledFxGraph fx ##", annotation=True)) == "compiled (fused) kernels"
    assert _category(event("aten::copy_")) == "copy/cast/index"
    assert _category(event("aten::mul")) == "other ops (elementwise, norms, softmax)"
