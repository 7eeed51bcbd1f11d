"""The run folder: one trainer at a time (a lock), visible to every rank, its config, metrics logger and the
end-of-run summary, plot and export; and the watch that stops the workers when torchrun's launcher is gone."""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from mm_gmpo import distributed
from mm_gmpo.checkpoint import export_hf
from mm_gmpo.config import Config, ConfigError, dump_yaml, to_dict
from mm_gmpo.logger import MetricsLogger, plot_training, read_metrics, run_summary


class RunFolder:
    """``trainer.output_dir`` for one run: locked (rank 0), checked to be shared by every rank, its config.yaml
    written, the metrics logger open (rank 0 writes). ``plot()`` redraws training.png; ``finish()`` exports the
    model (``trainer.export_hf``), writes the summary and releases the folder."""

    def __init__(self, cfg: Config, info: distributed.DistInfo):
        self.cfg, self.info, self.out = cfg, info, Path(cfg.trainer.output_dir)
        self.lock, problem = None, None
        if info.is_main:
            try:
                self.out.mkdir(parents=True, exist_ok=True)
                self.lock = lock_run_folder(self.out)
                start_or_continue(self.out, cfg.trainer.resume, cfg.trainer.overwrite)
            except ConfigError as e:
                problem = str(e)
            except OSError as e:  # a folder that cannot be made or moved: one line, and no rank left waiting
                problem = f"trainer.output_dir: {self.out}: {e.strerror or e}"
        problem = distributed.broadcast_object(problem)  # every rank stops, none waits in a collective
        if problem:
            if self.lock is not None:
                self.lock.close()
            raise ConfigError(problem)
        if info.world_size > 1:
            check_shared_folder(self.out, info)
        if info.is_main:
            (self.out / "config.yaml").write_text(dump_yaml(cfg))
        lg = cfg.logging
        self.log = MetricsLogger(self.out, enabled=info.is_main, tensorboard=lg.tensorboard, wandb=lg.wandb,
                                 wandb_project=lg.wandb_project, run_name=lg.run_name, config=to_dict(cfg))
        self.watch = LauncherWatch()

    def plot(self) -> Path | None:
        return plot_training(self.out / "metrics.jsonl", self.out / "training.png") if self.info.is_main else None

    def finish(self, policy: nn.Module, processor) -> None:
        if self.cfg.trainer.export_hf:  # gathered a tensor at a time, from wherever the shards are (CPU with offload)
            export_hf(policy, self.out / "hf_export", processor=processor,
                      save_adapter=self.cfg.model.lora.save_adapter)
        if self.info.is_main:
            png = self.plot()
            table = run_summary(read_metrics(self.out / "metrics.jsonl"))
            if table:
                (self.out / "summary.md").write_text(table)
                print(table)
            made = [p.name + ("/" if p.is_dir() else "") for p in sorted(self.out.iterdir())
                    if not p.name.startswith(".")]
            print(f"run folder: {self.out} ({', '.join(made)}){'' if png else ' (no training.png: nothing to plot)'}")
        self.log.close()
        if self.lock is not None:
            self.lock.close()


def earlier_run(out: Path) -> tuple[list[str], int]:
    """What an earlier run left in ``out``: its checkpoint folders' names and its number of logged metric rows."""
    from mm_gmpo.checkpoint import finished_checkpoints

    ckpts = [p.name for p in finished_checkpoints(out / "checkpoints")]
    metrics = out / "metrics.jsonl"
    rows = sum(1 for line in metrics.read_text(errors="replace").splitlines() if line.strip()) \
        if metrics.is_file() else 0
    return ckpts, rows


def start_or_continue(out: Path, resume: str, overwrite: bool) -> None:
    """Never a second run on top of an earlier one (rank 0, under the lock). An earlier run is continued
    (``resume=auto`` with a checkpoint), or refused with a ConfigError saying what is there and the choices, or,
    with ``trainer.overwrite``, moved whole to ``out/replaced_<time>/`` before anything is written."""
    import time

    ckpts, rows = earlier_run(out)
    if overwrite:
        entries = [p for p in out.iterdir() if p.name != ".lock" and not p.name.startswith("replaced_")]
        if entries:
            aside = out / time.strftime("replaced_%Y%m%d-%H%M%S")
            aside.mkdir()
            for p in entries:
                os.replace(p, aside / p.name)
            print(f"trainer.overwrite: the earlier run in {out} ({len(ckpts)} checkpoint(s), {rows} logged step(s)) "
                  f"was moved to {aside}")
        return
    what = (f"checkpoints {', '.join(ckpts[-3:])}" if ckpts else "no checkpoint") + f", {rows} logged step(s)"
    choices = ("choose another trainer.output_dir, or set trainer.overwrite=true to move the earlier run to "
               f"{out}/replaced_<time>/ first")
    if resume == "none" and (ckpts or rows):
        raise ConfigError(f"trainer.resume=none: {out} holds an earlier run ({what}); a new run would mix with it. "
                          f"Continue it with trainer.resume=auto, {choices}")
    if resume == "auto" and rows and not ckpts:
        raise ConfigError(f"trainer.resume=auto: {out} holds an earlier run ({what}) with nothing to resume from "
                          f"(it stopped before its first save, or saving was off); {choices}")


def lock_run_folder(out: Path):
    """One trainer per run folder: an exclusive ``flock`` on ``<out>/.lock``, which the kernel releases when the
    process dies (no stale locks after a crash or a kill). Returns the open file (keep it open), or raises
    ConfigError naming the holder's host and pid."""
    import fcntl
    import socket

    f = open(out / ".lock", "a+")  # noqa: SIM115 (held open for the whole run)
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise ConfigError(f"trainer.output_dir: {out} is in use by a running trainer ({holder}); wait for it or stop "
                          "it, or choose another trainer.output_dir") from None
    f.seek(0)
    f.truncate()
    f.write(f"host {socket.gethostname()} pid {os.getpid()}\n")
    f.flush()
    return f


def check_shared_folder(out: Path, info: distributed.DistInfo) -> None:
    """Every rank must see the files rank 0 writes into ``out`` (checkpoints are written into folders rank 0
    creates, and resuming reads them on every rank): on several nodes ``trainer.output_dir`` must be on a shared
    filesystem. Raises ConfigError naming the ranks (and hosts) that cannot see it."""
    blind = ranks_not_seeing(out)
    if blind:
        ranks = ", ".join(f"rank {k} on {v}" for k, v in sorted(blind.items())[:4])
        raise ConfigError(f"trainer.output_dir: {out.resolve()} is not shared by every rank: {ranks} cannot see "
                          "the file rank 0 wrote there. On several nodes put output_dir on a filesystem every "
                          "node mounts at the same path (NFS, Lustre, ...)")


class LauncherWatch:
    """Under torchrun, notices when the launcher (this worker's parent) is gone: killing the launcher alone leaves
    its workers running in their own process groups, still training into the run folder. ``check()`` raises
    then; outside torchrun it never does."""

    def __init__(self, parent: int | None = None):
        self.parent = parent if parent is not None else (os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ or
                                                         "LOCAL_RANK" in os.environ else None)

    def check(self) -> None:
        if self.parent is not None and os.getppid() != self.parent:
            raise RuntimeError(f"the launcher (pid {self.parent}) is gone; this worker (pid {os.getpid()}) stops "
                               "instead of training on without it")


def ranks_not_seeing(folder: Path) -> dict[int, str]:
    """{rank: host} of the ranks that cannot read back a file rank 0 writes into ``folder`` (a fresh token each
    time; the file is removed); empty when every rank sees it, as on a shared filesystem. Every rank calls it."""
    import secrets
    import socket

    token = distributed.broadcast_object(secrets.token_hex(8) if distributed.rank() == 0 else None)
    probe = Path(folder) / f".shared_check_{token}"
    if distributed.rank() == 0:
        probe.write_text(token)
    distributed.barrier()
    try:
        seen = probe.read_text() == token
    except OSError:
        seen = False
    blind = distributed.gather_dicts({} if seen else {distributed.rank(): socket.gethostname()})
    distributed.barrier()
    if distributed.rank() == 0:
        probe.unlink(missing_ok=True)
    return {int(k): v for k, v in blind.items()}
