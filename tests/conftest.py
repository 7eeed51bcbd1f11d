"""Fixtures shared by several test files."""

import os

import pytest


@pytest.fixture
def own_process_group():
    """A one-process gloo group for FSDP2 in this test only: torchrun tests later in the session must not inherit
    its MASTER_ADDR / MASTER_PORT (the port stays bound while the group lives)."""
    import torch.distributed as dist

    saved = {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT")}
    was_initialized = dist.is_initialized()
    yield
    if dist.is_initialized() and not was_initialized:
        dist.destroy_process_group()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
