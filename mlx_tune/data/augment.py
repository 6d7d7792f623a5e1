"""Instruction-template augmentation of the first user turn (or a completion's prompt).

Whether a record is rewritten, and with which template, is a hash of (seed, epoch, record
line): deterministic, independent of batch order and prefetching, so a resumed run
rewrites exactly the records an uninterrupted run would have.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional, Sequence

from mlx_tune.config.schema import AugmentationSpec
from mlx_tune.data import seeding
from mlx_tune.data.records import DataError, Record


def load_templates(aug: AugmentationSpec, data_dir: Optional[str | Path] = None) -> list[str]:
    """The templates (from templates_file when set), each checked to format with {text}."""
    templates = list(aug.templates)
    if aug.templates_file:
        path = Path(aug.templates_file)
        if not path.is_file() and data_dir is not None and (Path(data_dir) / path).is_file():
            path = Path(data_dir) / path  # a bare name may sit next to the data
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as e:
            raise DataError(f"{aug.templates_file}: cannot read augmentation templates "
                            f"({e.strerror or e})") from None
        templates = [t for t in lines if t.strip()]
        where = f"{path}: "
    else:
        where = "augmentation.templates: "
    if not templates:
        raise DataError(f"{where}no augmentation templates (need at least one with {{text}})")
    for t in templates:
        if not isinstance(t, str) or "{text}" not in t:
            raise DataError(f"{where}augmentation template {t!r} has no {{text}} placeholder")
        try:
            t.format(text="x")
        except (KeyError, IndexError, ValueError) as e:
            raise DataError(f"{where}augmentation template {t!r} does not format with only "
                            f"{{text}} ({type(e).__name__}: {e}); write literal braces as "
                            "{{ and }}") from None
    return templates


@dataclasses.dataclass(frozen=True)
class Augmenter:
    seed: int
    prob: float
    templates: Sequence[str]

    def choice(self, epoch: int, line: int) -> Optional[str]:
        """The template applied to record ``line`` in ``epoch``, or None."""
        if self.prob <= 0 or seeding.unit(self.seed, seeding.AUGMENT_APPLY, epoch, line) >= self.prob:
            return None
        u = seeding.unit(self.seed, seeding.AUGMENT_TEMPLATE, epoch, line)
        return self.templates[min(int(u * len(self.templates)), len(self.templates) - 1)]

    def apply(self, record: Record, epoch: int) -> Optional[Record]:
        """The rewritten record, or None when this record is left as it is this epoch."""
        if not record.messages:
            return None  # text records have no user turn
        template = self.choice(epoch, record.line)
        if template is None:
            return None
        messages = list(record.messages)
        for i, m in enumerate(messages):
            if m["role"] == "user":
                messages[i] = {"role": "user", "content": template.format(text=m["content"])}
                return dataclasses.replace(record, messages=tuple(messages))
        return None


def make_augmenter(aug: AugmentationSpec, seed: int,
                   data_dir: Optional[str | Path] = None) -> Optional[Augmenter]:
    if not aug.enabled:
        return None
    return Augmenter(seed, aug.prob, tuple(load_templates(aug, data_dir)))
