"""Progress a person can follow: a bar with ETA on a terminal, plain periodic lines in a log."""

from __future__ import annotations

import logging
import sys
import time

from tqdm import tqdm

log = logging.getLogger("akd.train")


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
    )


class Progress:
    def __init__(
        self, total_epochs: int, steps_per_epoch: int, start_epoch: int = 0, log_every_s: float = 30.0, stream=None
    ):
        self.stream = stream = stream or sys.stderr
        self.total_epochs, self.steps_per_epoch = total_epochs, steps_per_epoch
        self.epoch, self.step_in_epoch = start_epoch, 0
        self.started = self.last_line = time.monotonic()
        self.log_every_s = log_every_s
        self.bar = None
        if stream.isatty():
            self.bar = tqdm(
                total=total_epochs * steps_per_epoch,
                initial=start_epoch * steps_per_epoch,
                unit="step",
                dynamic_ncols=True,
                file=stream,
            )
            self.bar.set_description(f"epoch {start_epoch + 1}/{total_epochs}")
        # steps run by this process, for the ETA
        self._done_steps = 0

    def step(self, **live: float) -> None:
        self.step_in_epoch += 1
        self._done_steps += 1
        text = {k: f"{v:.3f}" for k, v in live.items()}
        if self.bar is not None:
            self.bar.set_postfix(text, refresh=False)
            self.bar.update()
        elif time.monotonic() - self.last_line >= self.log_every_s:
            self.last_line = time.monotonic()
            log.info(
                "epoch %d/%d step %d/%d %s ETA %s",
                self.epoch + 1,
                self.total_epochs,
                self.step_in_epoch,
                self.steps_per_epoch,
                " ".join(f"{k} {v}" for k, v in text.items()),
                self.eta(),
            )

    def note(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_description(f"epoch {self.epoch + 1}/{self.total_epochs} ({text})")

    def eta(self) -> str:
        remaining = (self.total_epochs - self.epoch) * self.steps_per_epoch - self.step_in_epoch
        per_step = (time.monotonic() - self.started) / max(self._done_steps, 1)
        return _duration(remaining * per_step)

    def epoch_done(self, metrics: dict) -> None:
        self.epoch += 1
        self.step_in_epoch = 0
        shown = {
            k: metrics[k]
            for k in ("train_loss", "train_adv_acc", "val_clean_acc", "val_robust_acc")
            if metrics.get(k) is not None
        }
        line = " ".join(f"{k} {v:.4f}" for k, v in shown.items())
        message = f"epoch {self.epoch}/{self.total_epochs} {line} ({metrics['epoch_time_s']:.1f}s, ETA {self.eta()})"
        if self.bar is not None:
            self.bar.set_description(f"epoch {min(self.epoch + 1, self.total_epochs)}/{self.total_epochs}")
            self.bar.write(message, file=self.stream)
        else:
            log.info(message)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
