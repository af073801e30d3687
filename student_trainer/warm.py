"""`akd warm`: fill the teacher service's cache with a run's clean inputs before the run.

ARD, RSLAD, IAD and clean evaluation ask the teacher about clean training images, and augmentation makes each
image one of a fixed set of views (162 pad-crop-flip views for CIFAR; the image itself for digits). Warming sends
every view of every training image once, so those runs never wait for the teacher's forward pass. It asks by key
first, so rows already cached cost 16 bytes and no compute: a warm that was interrupted, or run again, redoes
nothing (it is resumable by construction).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from tqdm import tqdm

from shared.protocol import CacheMode
from student_trainer.config import TrainConfig
from student_trainer.data import AUGMENTED_VIEWS, augmentation_space, load_dataset
from student_trainer.train import make_teacher

log = logging.getLogger("akd.warm")


@dataclass
class Warmed:
    # views sent
    rows: int
    # of which the service had not cached yet
    uploaded: int
    seconds: float

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds else 0.0


def warm(cfg: TrainConfig, batch_rows: int = 512, log_every_s: float = 30.0) -> Warmed:
    """Every view of every training image of `cfg` (its dataset, split and teacher) through the service once."""
    if cfg.teacher is None or cfg.teacher.url is None:
        raise ValueError("akd warm needs a teacher service: set teacher.url (a local teacher has no cache to fill)")
    if cfg.teacher.cache.clean is not CacheMode.use:
        raise ValueError(
            f'akd warm stores clean rows: teacher.cache.clean must be "use", not "{cfg.teacher.cache.clean.value}"'
        )
    data = load_dataset(cfg.dataset, cfg.data_dir, cfg.val_size, cfg.limit_train)
    # the run's own client, checked against its dataset
    teacher = make_teacher(cfg, data, torch.device("cpu"))
    try:
        views = AUGMENTED_VIEWS if data.augment else 1
        total = len(data.train) * views
        log.info("warming %s's cache: %d images x %d views = %d rows", teacher.name, len(data.train), views, total)
        started = last_line = time.monotonic()
        done = 0
        with tqdm(total=total, unit="row", disable=not sys.stderr.isatty(), dynamic_ncols=True) as bar:
            for x in _views(data.train.x, data.augment, batch_rows):
                # clean inputs, as the trainer sends them: cache=use, by key first
                teacher(x.float() / 255.0)
                done += len(x)
                bar.update(len(x))
                if bar.disable and time.monotonic() - last_line >= log_every_s:
                    last_line = time.monotonic()
                    log.info("warm: %d/%d rows (%d computed so far)", done, total, teacher.rows_uploaded)
        return Warmed(done, teacher.rows_uploaded, time.monotonic() - started)
    finally:
        teacher.close()


def _views(images: torch.Tensor, augment: bool, batch_rows: int) -> Iterator[torch.Tensor]:
    """Batches of uint8 rows: each batch of images in every view the training loop can draw."""
    for start in range(0, len(images), batch_rows):
        batch = images[start : start + batch_rows]
        yield from (augmentation_space(batch) if augment else [batch])
