"""Weight sync (single process): engine log-probs equal the trainer's after sync; names are checked strictly."""

import pytest
import torch

from mm_gmpo.data.processing import load_processor
from mm_gmpo.models import build_model, tiny_qwen2_5_vl_config
from mm_gmpo.policy import Policy, collate
from mm_gmpo.rollout.hf import HFEngine
from mm_gmpo.weight_sync import sync_weights


def _probe():
    g = torch.Generator().manual_seed(0)
    return collate([torch.randint(0, 150000, (6,), generator=g).tolist()] * 2,
                   [torch.randint(0, 150000, (5,), generator=g).tolist()] * 2, pad_id=151643)


def test_sync_makes_engine_match_and_stale_names_fail():
    tok = load_processor().tokenizer
    trainer = build_model("t", random_init=True, config=tiny_qwen2_5_vl_config(), dtype=torch.float32, seed=0)
    other = build_model("t", random_init=True, config=tiny_qwen2_5_vl_config(), dtype=torch.float32, seed=1)
    engine = HFEngine(other, tok)
    probe = _probe()
    with torch.no_grad():
        want, _ = Policy(trainer)(probe)
        before, _ = Policy(other)(probe)
    assert (before - want).abs().max() > 0.1
    m = sync_weights(Policy(trainer), engine)
    with torch.no_grad():
        after, _ = Policy(other)(probe)
    assert torch.equal(after, want)
    assert m["perf/weight_sync_tensors"] == len(list(trainer.named_parameters()))
    with pytest.raises(KeyError, match=r"no parameter 'model\.bogus'"):
        engine.update_weights([("model.bogus", torch.zeros(1))])
    with pytest.raises(KeyError, match="stale"):
        engine.update_weights([("model.language_model.norm.weight", trainer.model.language_model.norm.weight)])
