"""The run's owner of checkpoints: where a run resumes from (and whether its changed settings allow it), and when
it saves. The files themselves are ``mm_gmpo.checkpoint``'s."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from mm_gmpo import distributed
from mm_gmpo.checkpoint import (
    CheckpointError,
    TrainerState,
    foreign_entries,
    load_checkpoint,
    remove_partial_saves,
    resume_point,
    save_checkpoint,
    verify_checkpoint,
)
from mm_gmpo.config import Config, ConfigError, config_changes, to_dict
from mm_gmpo.inputs import PromptSampler
from mm_gmpo.logger import MetricsLogger
from mm_gmpo.optim import set_base_lr


class Checkpointer:
    """``trainer.resume`` (auto: the newest intact checkpoint; a path; none), ``trainer.save_every`` (and the last
    step; -1: never), ``keep_last`` and ``save_errors``. With offload the state stays on the CPU for the save: the
    engine is awake then and holds the GPU memory."""

    def __init__(self, cfg: Config, out: Path, info: distributed.DistInfo, policy: nn.Module,
                 optimizer: torch.optim.Optimizer, scheduler):
        self.cfg, self.info, self.dir = cfg, info, Path(out) / "checkpoints"
        self.policy, self.optimizer, self.scheduler = policy, optimizer, scheduler

    def _resume_from(self) -> Path | None:
        t = self.cfg.trainer
        if t.resume == "auto":
            path, skipped = resume_point(self.dir)
            if path is None and skipped:  # never a new run on top of damaged ones (the next auto would load them)
                raise ConfigError(f"trainer.resume=auto: every checkpoint in {self.dir} is damaged ("
                                  f"{'; '.join(skipped[:3])}). Restore them, resume from one by path "
                                  "(trainer.resume=<folder>), choose another trainer.output_dir, or set "
                                  "trainer.overwrite=true to move the earlier run aside and start anew")
            if skipped and self.info.is_main:
                print("resume: skipped damaged checkpoint(s): " + "; ".join(skipped))
            return path
        if t.resume == "none":
            return None
        path = Path(t.resume)
        problem = verify_checkpoint(path)
        if problem:
            raise ConfigError(f"trainer.resume: {path} cannot be resumed from: {problem}")
        return path

    def resume(self, sampler: PromptSampler, log: MetricsLogger) -> TrainerState:
        """The state to start from: step 0, or a checkpoint's step with the policy, optimizer, scheduler, RNG and
        data position restored and the log rewound to it. A setting that changes the maths or the data order
        stops the run unless ``trainer.resume_allow_changes``; a new learning rate then applies from here on."""
        if self.info.is_main:
            remove_partial_saves(self.dir)
            foreign = foreign_entries(self.dir)
            if foreign:
                print(f"checkpoints: ignoring {', '.join(foreign[:5])} in {self.dir} (not a checkpoint this trainer "
                      "wrote under its own name; resume reads step_<8 digits> folders only)")
        distributed.barrier()
        path = self._resume_from()
        state = TrainerState()
        if path is not None:
            state = load_checkpoint(path, self.policy, self.optimizer, self.scheduler)
            self._check_changes(path, state.extra.get("config"))
            sampler.load_state_dict(state.data_position)
            log.rewind(state.step)  # steps logged after that checkpoint are redone: log each once
            if self.info.is_main:
                print(f"resumed from {path} at step {state.step}")
        state.extra["config"] = to_dict(self.cfg)  # saved with every checkpoint: a resume compares with these
        return state

    def _check_changes(self, path: Path, stored: dict | None) -> None:
        if stored is None:
            return
        maths, harmless = config_changes(stored, to_dict(self.cfg))
        if maths and not self.cfg.trainer.resume_allow_changes:
            raise ConfigError(f"resume from {path}: these settings differ from the checkpoint's and change the maths "
                              f"or the data order: {'; '.join(maths)}. Restore them, or set "
                              "trainer.resume_allow_changes=true to go on with the new values")
        if self.info.is_main and (maths or harmless):
            print(f"resume: settings changed since the checkpoint: {'; '.join(maths + harmless)}")
        if maths:
            set_base_lr(self.optimizer, self.scheduler, self.cfg.optim.lr)

    def maybe_save(self, state: TrainerState, total_steps: int) -> None:
        t = self.cfg.trainer
        if t.save_every < 0 or not ((t.save_every and state.step % t.save_every == 0) or state.step == total_steps):
            return
        try:
            save_checkpoint(self.dir, self.policy, self.optimizer, self.scheduler, state, keep_last=t.keep_last)
        except CheckpointError as e:
            if t.save_errors != "warn":
                raise
            if self.info.is_main:
                print(f"warning: {e}; training on (trainer.save_errors=warn)")
