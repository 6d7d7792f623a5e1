"""`mlx-tune train --supervise`: a small parent process that gets a crashed run back up.

- ``crashes.py``: how a training process ended (finished, a decision, a crash; memory or
  not), read from its exit status, the tail of its log and the kernel's OOM counter;
- ``policy.py``: what to do about a crash (restart after a backoff, halve the micro-batch,
  give up), as a pure function of the crashes seen so far;
- ``night.py``: the parent itself: runs the child, forwards signals, pauses for
  cooldowns, and writes every restart, adaptation and cooldown to metrics.jsonl.

Nothing here imports mlx, torch or numpy: the parent holds no model memory.
"""

# The supervisor's one-line status, handed to each run it starts (dashboard header, start
# record); unset when the run is not supervised.
STATUS_ENV = "MLX_TUNE_SUPERVISOR"
