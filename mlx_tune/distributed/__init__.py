"""Data-parallel training on the frameworks' own distributed engines.

Launch (nothing here starts processes):

    mlx.launch --hostfile hosts.json -- mlx-tune train -c spec.yaml           # MLX, N Macs
    mlx.launch -n 2 --backend ring -- python -m mlx_tune train -c spec.yaml   # MLX, 1 machine
    torchrun --nproc_per_node 2 -m mlx_tune train --backend torch -c spec.yaml

How a run is shared out (see docs/distributed.md):
- every rank draws the same global batch sequence and trains on its slice of each batch
  (``training.loop.Trainer``); the backends all-reduce gradient *sums* and divide by the
  global token count, so N ranks x batch/N equal 1 rank x batch, up to float rounding;
- ``launch``: a launch that does not fit the backend or the spec fails in the first
  second, on every rank alike;
- ``decisions``: rank 0 alone decides whether to resume (its checkpoint's arrays travel
  to the other ranks through the collectives, so the output directory need not be on
  shared storage), when to stop, whether to give up after failed saves; it alone writes
  files;
- ``peers``: a dead peer ends every survivor with one line on stderr and
  ``EXIT_PEER_LOST``; a hung one is timed out by a watchdog.

The collectives themselves are backend methods (``backends.base.Collectives``): nothing
in this package knows which framework it talks to.
"""
