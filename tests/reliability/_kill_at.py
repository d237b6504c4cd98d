"""Run ``chipo`` and SIGKILL the process at a chosen point (fault injection for tests/reliability).

usage: python _kill_at.py step:N chipo-args...
  step:N     kill -9 as optimizer step N begins (steps < N are logged and their checkpoints saved); chipo train,
             sft and reward (transformers.Trainer) and chipo rl and online (chipo.train.sampled)
  sigint:N   Ctrl-C (SIGINT) as optimizer step N begins
  precompute kill -9 while the reference log-prob cache entry is being written
  save:N     kill -9 inside the save of checkpoint-N (its weights written; no optimizer state, no trainer_state)
"""

import os
import signal
import sys

import transformers

from chipo.cli.main import main


def _die():
    os.kill(os.getpid(), signal.SIGKILL)


def install(spec: str) -> None:
    kind, _, n = spec.partition(":")
    if kind in ("step", "sigint"):
        # A process started with SIGINT ignored (as pytest-xdist's workers may start their children) keeps it
        # ignored: Python installs its KeyboardInterrupt handler only over the default disposition. A user's
        # terminal gives the default; so does this harness, explicitly.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        original = transformers.Trainer.training_step

        def training_step(self, *args, **kwargs):
            if self.state.global_step + 1 >= int(n):
                if kind == "step":
                    _die()
                os.kill(os.getpid(), signal.SIGINT)
            return original(self, *args, **kwargs)

        transformers.Trainer.training_step = training_step

        from chipo.train.sampled import SampledTrainer  # chipo rl / chipo online: step is 0-based there

        original_sampled = SampledTrainer.train_step

        def sampled_step(self, step):
            if step + 1 >= int(n):
                if kind == "step":
                    _die()
                os.kill(os.getpid(), signal.SIGINT)
            return original_sampled(self, step)

        SampledTrainer.train_step = sampled_step
    elif kind == "save":
        original_save = transformers.Trainer._save_optimizer_and_scheduler

        def save_optimizer_and_scheduler(self, output_dir):
            if self.state.global_step >= int(n):
                _die()  # save_model already wrote the weights of checkpoint-N
            return original_save(self, output_dir)

        transformers.Trainer._save_optimizer_and_scheduler = save_optimizer_and_scheduler
    elif kind == "precompute":
        import chipo.train.reference as reference

        original_save = reference.save_file

        def save_file(tensors, filename, *args, **kwargs):  # the entry's temporary file is written: die there
            original_save(tensors, filename, *args, **kwargs)
            _die()

        reference.save_file = save_file
    else:
        raise SystemExit(f"unknown kill point {spec!r}")


if __name__ == "__main__":
    install(sys.argv[1])
    sys.exit(main(sys.argv[2:]))
