"""Checkpoints that a crash or kill can never corrupt, and that resume on a different number of ranks.

Layout under ``<run>/checkpoints/``::

    step_00000012/            a finished checkpoint (only ever appears by an atomic rename)
        model_optim/          torch.distributed.checkpoint shards of model + optimizer (any world size can load)
        trainer_state.json    step, LR-scheduler state, data position, config echo
        rng/rank_<r>.pt       per-rank RNG states (torch, cuda, python, numpy; tensors and lists only)
        manifest.json         size and sha256 of every other file, written last
    .tmp_step_00000013/       a checkpoint being written; ignored and cleaned up on the next save
    latest                    text file naming the newest finished checkpoint (replaced atomically)

A kill during a save leaves only a ``.tmp_`` folder behind: the last finished checkpoint is untouched. A
finished checkpoint that was damaged later (a truncated shard, a missing or rewritten file) fails its manifest:
:func:`resume_point` then takes the newest one that verifies and says which it skipped and why.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mm_gmpo import distributed
from mm_gmpo.lora import lora_scalings, merge_lora
from mm_gmpo.lora import save_adapter as save_adapter_folder

STEP_PREFIX = "step_"


@dataclass
class TrainerState:
    """What besides weights and optimizer a resumed run needs to continue exactly."""

    step: int = 0
    data_position: dict[str, Any] = field(default_factory=dict)  # e.g. {"epoch": 1, "index": 40, "seed": 0}
    scheduler: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from; the message names the file and what to do."""


def _rng_state() -> dict[str, Any]:
    """Every RNG this process draws from, as tensors, ints and lists only: ``torch.load(weights_only=True)``
    reads it back, so an RNG file cannot run code."""
    version, mt, gauss = random.getstate()
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": [version, list(mt), gauss]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]
    except ImportError:
        pass
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


def _plain(x: Any) -> Any:
    """JSON-ready values: 0-d tensors become floats (torchao's optimizers keep each group's lr as a tensor, which
    the LR scheduler's state then holds; ``json.dumps(default=str)`` would store "tensor(0.0010)")."""
    if torch.is_tensor(x) and x.ndim == 0:
        return x.item()
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    return x


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


MANIFEST = "manifest.json"


def _files(folder: Path) -> list[str]:
    """Every file of a checkpoint folder except the manifest, as sorted relative paths."""
    return sorted(str(f.relative_to(folder)) for f in folder.rglob("*") if f.is_file() and f.name != MANIFEST)


def _digests(folder: Path, names: list[str]) -> dict[str, list]:
    out = {}
    for name in names:
        h = hashlib.sha256()
        with open(folder / name, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        out[name] = [(folder / name).stat().st_size, h.hexdigest()]
    return out


def verify_checkpoint(path: Path) -> str | None:
    """Why ``path`` cannot be resumed from, or None when its files match its manifest (sizes on every rank, hashes
    shared out over the ranks; every rank gets the same answer). A checkpoint without a manifest (written before
    manifests existed) passes on its trainer_state.json alone."""
    manifest = path / MANIFEST
    problem = None
    if not (path / "trainer_state.json").exists():
        problem = "no trainer_state.json"
    elif manifest.exists():
        try:
            want = json.loads(manifest.read_text())
        except ValueError:
            problem = f"{MANIFEST} is not valid JSON"
        else:
            have = _files(path)
            missing = sorted(set(want) - set(have))
            extra = sorted(set(have) - set(want))
            sizes = [n for n in want if n in have and (path / n).stat().st_size != want[n][0]]
            if missing or extra or sizes:
                problem = (f"missing {missing[:3]}" if missing else f"unexpected files {extra[:3]}" if extra else
                           f"{sizes[0]} has {(path / sizes[0]).stat().st_size} bytes, the manifest says "
                           f"{want[sizes[0]][0]}")
            else:
                mine = sorted(want)[distributed.rank()::distributed.world_size()]
                got = _digests(path, mine)
                bad = [n for n in mine if got[n][1] != want[n][1]]
                problem = f"{bad[0]} does not match its hash" if bad else None
    problems = distributed.gather_dicts({str(distributed.rank()): problem})
    return next((v for _, v in sorted(problems.items()) if v), None)


def resume_point(ckpt_dir: str | Path) -> tuple[Path | None, list[str]]:
    """The newest finished checkpoint that verifies, and one line per newer one skipped (folder and why). Rank 0
    lists the candidates and every rank checks the same ones, so all ranks resume from the same checkpoint or
    none (a rank that saw no checkpoint would otherwise skip the collective load the others wait in)."""
    skipped = []
    names = distributed.broadcast_object([p.name for p in finished_checkpoints(Path(ckpt_dir))])
    for path in reversed([Path(ckpt_dir) / n for n in names]):
        problem = verify_checkpoint(path)
        if problem is None:
            return path, skipped
        skipped.append(f"{path.name}: {problem}")
    return None, skipped


STEP_NAME = re.compile(rf"{STEP_PREFIX}(\d+)")


def finished_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Finished checkpoints, oldest first: folders named as :func:`save_checkpoint` names them (``step_00000012``)
    and holding its files; anything else there (``step_00000004_backup``) is not one (see :func:`foreign_entries`)."""
    if not ckpt_dir.is_dir():
        return []
    done = [p for p in ckpt_dir.iterdir() if p.is_dir() and STEP_NAME.fullmatch(p.name)
            and ((p / "trainer_state.json").exists() or (p / MANIFEST).exists())]
    return sorted(done, key=lambda p: int(p.name[len(STEP_PREFIX):]))


def foreign_entries(ckpt_dir: Path) -> list[str]:
    """Names in ``ckpt_dir`` that no save wrote (copies, backups, stray files): ignored by resume and keep_last."""
    if not ckpt_dir.is_dir():
        return []
    ours = {p.name for p in finished_checkpoints(ckpt_dir)} | {"latest"}
    return sorted(p.name for p in ckpt_dir.iterdir() if p.name not in ours and not p.name.startswith((".tmp_", "."))
                  and not (p.is_dir() and STEP_NAME.fullmatch(p.name)))


def latest_checkpoint(ckpt_dir: str | Path) -> Path | None:
    """The newest finished checkpoint, or None."""
    done = finished_checkpoints(Path(ckpt_dir))
    return done[-1] if done else None


def remove_partial_saves(ckpt_dir: Path) -> None:
    """The folders of saves that were killed or failed before they finished (rank 0)."""
    for stale in Path(ckpt_dir).glob(".tmp_*"):
        shutil.rmtree(stale, ignore_errors=True)


def save_checkpoint(
    ckpt_dir: str | Path,
    policy: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    state: TrainerState,
    *,
    keep_last: int = 2,
) -> Path:
    """Write a checkpoint atomically (all ranks call this); returns the finished path."""
    ckpt_dir = Path(ckpt_dir)
    name = f"{STEP_PREFIX}{state.step:08d}"
    final = ckpt_dir / name
    tmp = ckpt_dir / f".tmp_{name}"
    if distributed.rank() == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        remove_partial_saves(ckpt_dir)
        (tmp / "rng").mkdir(parents=True)
    distributed.barrier()

    failure = None
    try:
        save_sharded(tmp / "model_optim", policy, optimizer)
        torch.save(_rng_state(), tmp / "rng" / f"rank_{distributed.rank()}.pt")
        if distributed.rank() == 0:
            if scheduler is not None:
                state.scheduler = _plain(scheduler.state_dict())
            _atomic_write_text(tmp / "trainer_state.json", json.dumps(asdict(state), indent=2, default=str))
    except OSError as e:  # a full disk, a permission: every rank hears of it (none waits in a barrier)
        failure = str(e.strerror or e)
    failures = distributed.gather_dicts({str(distributed.rank()): failure})
    failure = next((v for _, v in sorted(failures.items()) if v), None)
    if failure is not None:  # say so, and leave no partial folder behind
        if distributed.rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        free = shutil.disk_usage(ckpt_dir).free / 2**30 if ckpt_dir.exists() else float("nan")
        raise CheckpointError(f"saving {final} failed: {failure} ({free:.1f} GiB free on that disk); the "
                              "previous checkpoint is intact")
    # every file's size and hash, the hashing shared out over the ranks; the manifest is the last file written
    digests = distributed.gather_dicts(_digests(tmp, _files(tmp)[distributed.rank()::distributed.world_size()]))
    if distributed.rank() == 0:
        _atomic_write_text(tmp / MANIFEST, json.dumps(digests, indent=1, sort_keys=True))
        _fsync_dir(tmp)
        if final.exists():  # re-saving the same step: keep the old one until the new one is complete
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(ckpt_dir)
        _atomic_write_text(ckpt_dir / "latest", name + "\n")
        for old in finished_checkpoints(ckpt_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()
    return final


def load_checkpoint(
    path: str | Path,
    policy: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
) -> TrainerState:
    """Restore model, optimizer, scheduler and this rank's RNG; works on any world size.

    A rank with no saved RNG state (resuming on more ranks than were saved) keeps its own seeding.
    """
    path = Path(path)
    if not (path / "trainer_state.json").exists():
        raise FileNotFoundError(f"{path}: not a finished checkpoint (no trainer_state.json)")
    load_sharded(path / "model_optim", policy, optimizer)
    raw = json.loads((path / "trainer_state.json").read_text())
    state = TrainerState(**raw)
    if scheduler is not None and state.scheduler:
        scheduler.load_state_dict(state.scheduler)
    rng_file = path / "rng" / f"rank_{distributed.rank()}.pt"
    if rng_file.exists():
        try:
            rng = torch.load(rng_file, weights_only=True)  # tensors and plain values only: nothing in it runs
        except Exception as e:
            raise CheckpointError(f"{rng_file}: not an RNG state this trainer wrote ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:200]}); delete the checkpoint folder {path} to resume "
                                  "from the one before it") from None
        _set_rng_state(rng)
    return state


def export_hf(policy: nn.Module, out_dir: str | Path, processor=None, *, save_adapter: bool = True) -> Path | None:
    """Write an HF-format folder (safetensors + config + processor) that transformers and vLLM load directly.

    With LoRA the weights are merged (base + scaling * B @ A) under the plain names, and with ``save_adapter``
    the PEFT adapter folder goes to ``<out_dir>/adapter`` too. All ranks call this (the full state dict is
    gathered); rank 0 writes, through a temp folder renamed at the end.
    """
    out_dir = Path(out_dir)
    sd = distributed.full_model_state_dict(policy)
    if distributed.rank() == 0:
        tmp = out_dir.with_name(f".tmp_{out_dir.name}")
        shutil.rmtree(tmp, ignore_errors=True)
        model = policy.model
        scalings = lora_scalings(model)
        if scalings and save_adapter:
            save_adapter_folder(model, sd, tmp / "adapter")
        dtype = model.config.dtype if isinstance(model.config.dtype, torch.dtype) else None
        sd = {k: v.to(dtype or v.dtype) for k, v in merge_lora(sd.items(), scalings)}
        model.save_pretrained(tmp, state_dict=sd, safe_serialization=True)
        if processor is not None:
            processor.save_pretrained(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    distributed.barrier()
    return out_dir if distributed.rank() == 0 else None


# ---------------------------------------------------------------- sharded model and optimizer state (DCP)


def _dcp_options(policy: nn.Module):
    """With LoRA a checkpoint holds the adapters only: the frozen base weights come from model.path again."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    from mm_gmpo.lora import has_lora

    return StateDictOptions(ignore_frozen_params=True, strict=False) if has_lora(policy) else None


def _dcp_state(policy: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    options = _dcp_options(policy)
    model_sd, optim_sd = get_state_dict(policy, optimizer if optimizer is not None else [], options=options)
    if options is not None:  # a tied LM head is listed apart from the frozen embedding it shares: drop it too
        trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
        model_sd = {k: v for k, v in model_sd.items() if k in trainable}
    return {"model": model_sd, "optim": optim_sd} if optimizer is not None else {"model": model_sd}


def save_sharded(path: Path, policy: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Model and optimizer state with torch.distributed.checkpoint: every rank writes its shards."""
    import torch.distributed.checkpoint as dcp

    dcp.save(_dcp_state(policy, optimizer), checkpoint_id=str(path))


def load_sharded(path: Path, policy: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Load a :func:`save_sharded` checkpoint into this (possibly differently sharded) policy and optimizer. Nothing
    in the folder can run code: the metadata goes through :func:`safe_unpickle`, values through a weights-only
    ``torch.load`` (torch's own reader would use plain ``pickle.load`` on both)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = _dcp_state(policy, optimizer)
    reader, planner = _safe_dcp(str(path))
    dcp.load(state, storage_reader=reader, planner=planner)
    set_state_dict(policy, optimizer if optimizer is not None else [], model_state_dict=state["model"],
                   optim_state_dict=state.get("optim", {}), options=_dcp_options(policy))


class UnsafeCheckpoint(CheckpointError):
    """A checkpoint file that asks to build something a checkpoint never holds (a pickle that would run code)."""


_DCP_MODULES = ("torch.distributed.checkpoint.metadata",)
_SAFE_GLOBALS = {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
                 ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"), ("pathlib", "PosixPath"),
                 ("pathlib", "PurePosixPath"), ("pathlib", "Path")}


class _RestrictedUnpickler(pickle.Unpickler):
    """Builds only what DCP metadata holds: its own dataclasses and enums, ``torch.Size``, dtypes, layouts, paths
    and containers. Any other global (``os.system``, ``builtins.eval``, a class with a hostile ``__reduce__``) is
    refused before it is looked up, so nothing runs."""

    def find_class(self, module: str, name: str):
        if module in _DCP_MODULES and not name.startswith("__"):
            import importlib

            obj = getattr(importlib.import_module(module), name, None)
            if isinstance(obj, type) and obj.__module__ == module:
                return obj
        elif module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        elif (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        raise UnsafeCheckpoint(f"{module}.{name}")


def safe_unpickle(f, where: str) -> Any:
    """A pickle from a checkpoint folder, read with :class:`_RestrictedUnpickler`; a refused global or a damaged
    file is a CheckpointError naming the file."""
    try:
        return _RestrictedUnpickler(f).load()
    except UnsafeCheckpoint as e:
        raise UnsafeCheckpoint(f"{where}: refused to load: the file asks for {e}, which no checkpoint this trainer "
                               "writes holds (a crafted or foreign file); nothing in it was run. Delete that "
                               "checkpoint folder or resume from another") from None
    except Exception as e:
        raise CheckpointError(f"{where}: not DCP metadata this trainer wrote ({type(e).__name__}: {e}); delete that "
                              "checkpoint folder or resume from another") from None


def _safe_dcp(path: str):
    """A DCP storage reader and load planner for ``path`` that load nothing but data (torch.distributed.checkpoint
    is imported here, not at module import: it is slow to import)."""
    from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    meta_file = Path(path) / ".metadata"
    if not meta_file.is_file():
        raise CheckpointError(f"{meta_file}: missing; delete that checkpoint folder or resume from another")
    with open(meta_file, "rb") as f:  # read here, not in the reader: DCP swallows a reader's errors and retries
        metadata = safe_unpickle(f, str(meta_file))
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{meta_file}: holds a {type(metadata).__name__}, not DCP metadata; delete that "
                              "checkpoint folder or resume from another")

    class SafeReader(FileSystemReader):
        def read_metadata(self):  # the global metadata only (no rank-local fallback: saves here never write one)
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    class SafePlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value) -> None:  # non-tensor values (lr, betas, ...): weights-only
            try:
                obj = torch.load(value, weights_only=True)
            except pickle.UnpicklingError as e:
                raise UnsafeCheckpoint(f"a value in the checkpoint ({read_item.dest_index.fqn}) is not plain data: "
                                       f"{str(e).splitlines()[0][:200]}; nothing in it was run. Delete that "
                                       "checkpoint folder or resume from another") from None
            if self.flatten_state_dict:  # as torch's DefaultLoadPlanner.load_bytes
                from torch.distributed.checkpoint._traverse import set_element

                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    return SafeReader(path), SafePlanner()
