"""Per-epoch filters: curriculum stages and a progressive quality threshold.

Epochs are 0-based, matching ``CurriculumStage.until_epoch`` ("applies to epochs <
until_epoch"). Records without the metadata a rule needs (no ``quality``, no
``difficulty``) pass that rule: a partial annotation should not silently empty a dataset.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from mlx_tune.config.schema import CurriculumStage, QualitySpec
from mlx_tune.data.records import Record


def stage_for_epoch(stages: Sequence[CurriculumStage], epoch: int
                    ) -> tuple[Optional[int], Optional[CurriculumStage]]:
    """(1-based stage number, stage) of the first stage with until_epoch > epoch."""
    for i, stage in enumerate(stages):
        if stage.until_epoch > epoch:
            return i + 1, stage
    return None, None


def quality_threshold(quality: QualitySpec, epoch: int) -> Optional[float]:
    """start -> end linearly over ramp_epochs; None when no quality filter is set."""
    if quality.start is None:
        return None
    if quality.ramp_epochs <= 0:
        return quality.end
    t = min(epoch / quality.ramp_epochs, 1.0)
    # Rounded so that a threshold meant to be 0.64 does not exclude a 0.64 record.
    return round(quality.start + (quality.end - quality.start) * t, 6)


def stage_keeps(stage: Optional[CurriculumStage], record: Record, length: int) -> bool:
    if stage is None:
        return True
    if stage.max_tokens is not None and length > stage.max_tokens:
        return False
    if stage.max_turns is not None and record.user_turns > stage.max_turns:
        return False
    if (stage.max_difficulty is not None and record.difficulty is not None
            and record.difficulty > stage.max_difficulty):
        return False
    return True


def quality_keeps(threshold: Optional[float], record: Record) -> bool:
    return threshold is None or record.quality is None or record.quality >= threshold


@dataclass
class EpochFilter:
    """The filters of one epoch, and the counts for its log line."""

    epoch: int
    stage_number: Optional[int]
    stage: Optional[CurriculumStage]
    threshold: Optional[float]
    has_curriculum: bool
    seen: int = 0
    after_stage: int = 0
    kept: int = 0

    @property
    def active(self) -> bool:
        return self.has_curriculum or self.threshold is not None

    def keeps(self, record: Record, length: int) -> bool:
        self.seen += 1
        if not stage_keeps(self.stage, record, length):
            return False
        self.after_stage += 1
        if not quality_keeps(self.threshold, record):
            return False
        self.kept += 1
        return True

    def message(self) -> str:
        """e.g. "epoch 1: curriculum stage 2 keeps 812/1500 records; quality >= 0.58 keeps 700"."""
        head = f"epoch {self.epoch}: "
        if self.stage is not None:
            head += f"curriculum stage {self.stage_number} keeps {self.after_stage}/{self.seen} records"
        elif self.has_curriculum:
            head += f"curriculum complete, {self.after_stage}/{self.seen} records"
        else:
            head += f"{self.seen} records"
        if self.threshold is not None:
            head += f"; quality >= {self.threshold:g} keeps {self.kept}"
        return head


def epoch_filter(stages: Sequence[CurriculumStage], quality: QualitySpec, epoch: int) -> EpochFilter:
    number, stage = stage_for_epoch(stages, epoch)
    return EpochFilter(epoch, number, stage, quality_threshold(quality, epoch), bool(stages))
