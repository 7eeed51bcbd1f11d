"""Reliability and security, round 3 (issue 32): no file runs code (checkpoint pickles, image decoders), runs never
silently mix (resume=none over checkpoints, odd folder names, eval folders), memory and time are bounded by the
input, and bad input is one line or a DataError naming file, row and field."""

import json
import os
import pickle
from pathlib import Path

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
