"""The macOS GPU watchdog: whether the run has the maintainers' workaround in place.

A long Metal command buffer (a big training step) can make the GPU driver's watchdog take
the GPU for hung and panic the machine, a reboot in the night (ml-explore/mlx #3267,
closed upstream as won't-fix). The MLX maintainers' workaround is
``AGX_RELAX_CDM_CTXSTORE_TIMEOUT=1`` in the environment before Metal starts, which
relaxes the driver's context-store timeout. mlx-tune does not set it for the user: it
changes the driver's behaviour for the process, so ``doctor`` and the start of a run on
macOS say whether it is set and what it does. (One project's A/B test also found that
holding the display awake triggers the watchdog: system/keepawake.py never does.)
"""

from __future__ import annotations

import os
from typing import Mapping

WATCHDOG_ENV = "AGX_RELAX_CDM_CTXSTORE_TIMEOUT"


def watchdog_status(env: Mapping[str, str] = os.environ) -> tuple[bool, str]:
    """(whether the workaround is set, one line saying so and what it does)."""
    if env.get(WATCHDOG_ENV, "").strip() == "1":
        return True, (f"{WATCHDOG_ENV}=1: the Metal driver's context-store timeout is relaxed, "
                      "so a long GPU step is not taken for a hung GPU (ml-explore/mlx #3267)")
    return False, (f"{WATCHDOG_ENV} is not set: a long Metal command buffer can trip the GPU "
                   "watchdog and reboot the Mac (ml-explore/mlx #3267); "
                   f"`export {WATCHDOG_ENV}=1` before starting relaxes it")
