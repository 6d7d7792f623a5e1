"""Data-parallel training on the frameworks' own distributed engines.

Launch (nothing here starts processes):

    mlx.launch --hostfile hosts.json -- mlx-tune train -c spec.yaml           # MLX, N Macs
    mlx.launch -n 2 --backend ring -- python -m mlx_tune train -c spec.yaml   # MLX, 1 machine
    torchrun --nproc_per_node 2 -m mlx_tune train --backend torch -c spec.yaml

How a run is shared out (see docs/distributed.md):
- every rank draws the same global batch sequence and trains on its slice of each batch
  (``loop.Trainer``); the backends all-reduce gradient *sums* and divide by the global
  token count, so N ranks x batch/N equal 1 rank x batch, up to float rounding;
- rank 0 alone decides: whether to resume (``share_resume_point``: the checkpoint's
  arrays travel to the other ranks through the collective itself, so the output
  directory need not be on shared storage), when to stop (``broadcast_stop``/``agree``),
  whether to give up after failed saves (``broadcast_flag``); it alone writes files;
- a dead peer ends every survivor with one line on stderr and ``EXIT_PEER_LOST``: MLX's
  ring backend and gloo raise when a socket closes (``peer_guard``); a peer that hangs
  without closing its sockets is caught by ``Watchdog`` after ``MLX_TUNE_DIST_TIMEOUT``
  seconds without a finished step (default 300, 0 = off).

Every function here is a collective: all ranks call it at the same point, in the same
order. With one process they return their input and touch nothing.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from mlx_tune.checkpoint.manager import Loaded
from mlx_tune.exit_codes import EXIT_PEER_LOST, STOP_RULE_EXIT_CODES
from mlx_tune.training.monitors import StopDecision
from mlx_tune.config.spec import Spec, SpecError

TIMEOUT_ENV = "MLX_TUNE_DIST_TIMEOUT"
DEFAULT_TIMEOUT = 300.0
RESUME_HINT = "resume every rank with the same command and --auto-resume"

# What the engines say when the other end of a collective is gone.
PEER_FAILURE_MARKERS = (
    "[ring]",  # MLX ring: "connection to a peer was lost"
    "connection closed by peer", "connection reset by peer", "broken pipe",  # gloo
    "socket closed", "nccl communicator was aborted", "ncclremoteerror",  # nccl
)
_RULES = sorted(STOP_RULE_EXIT_CODES)  # stop rule <-> a small integer on the wire (0 = no stop)


# -- the two engines behind one small interface -------------------------------------

def world_of(backend: Any) -> tuple[int, int]:
    return getattr(backend, "rank", 0), getattr(backend, "world_size", 1)


def _is_mlx(backend: Any) -> bool:
    return getattr(backend, "name", "mlx") == "mlx"


def all_sum_ints(values: list[int], backend: Any) -> list[int]:
    """Sum a few integers over all ranks (the currency of every decision below)."""
    if _is_mlx(backend):
        import mlx.core as mx
        out = mx.distributed.all_sum(mx.array(values, dtype=mx.int64), stream=mx.cpu)
        return [int(v) for v in out.tolist()]
    import torch
    import torch.distributed as dist
    t = torch.tensor(values, dtype=torch.int64, device=_torch_device(backend))
    dist.all_reduce(t)
    return [int(v) for v in t.tolist()]


def _torch_device(backend: Any) -> Any:
    """Where collectives run: CUDA for nccl, the CPU for gloo."""
    import torch.distributed as dist
    return getattr(backend, "device", "cpu") if dist.get_backend() == "nccl" else "cpu"


def broadcast_json(obj: Any, backend: Any) -> Any:
    """Rank 0's JSON-able ``obj`` on every rank (other ranks pass anything)."""
    rank, _ = world_of(backend)
    data = json.dumps(obj).encode() if rank == 0 else b""
    (size,) = all_sum_ints([len(data)], backend)
    raw = np.frombuffer(data, dtype=np.uint8) if rank == 0 else np.zeros(size, dtype=np.uint8)
    if _is_mlx(backend):
        import mlx.core as mx
        got = np.array(mx.distributed.all_sum(mx.array(raw), stream=mx.cpu), dtype=np.uint8)
    else:
        import torch
        import torch.distributed as dist
        t = torch.from_numpy(raw.copy()).to(_torch_device(backend))
        dist.broadcast(t, src=0)
        got = t.cpu().numpy()
    return obj if rank == 0 else json.loads(got.tobytes().decode())


def broadcast_arrays(arrays: dict[str, Any] | None, backend: Any) -> dict[str, Any]:
    """Rank 0's named arrays on every rank, bit for bit, whatever their dtype.

    MLX has no broadcast: rank 0 sends its arrays into an all_sum that the other ranks
    feed with zeros. Floats travel as unsigned integers of the same width, so nothing is
    rounded and -0.0 stays -0.0. One array at a time: peak memory is one array."""
    rank, _ = world_of(backend)
    header = None
    if rank == 0:
        header = [[name, list(a.shape), str(a.dtype).rsplit(".", 1)[-1]]
                  for name, a in arrays.items()]
    header = broadcast_json(header, backend)
    if _is_mlx(backend):
        return _broadcast_mlx(header, arrays, rank)
    return _broadcast_torch(header, arrays, rank, backend)


def _broadcast_mlx(header: list, arrays: dict | None, rank: int) -> dict:
    import mlx.core as mx
    out = {}
    for name, shape, dtype_name in header:
        dtype = getattr(mx, dtype_name, None) or getattr(mx, dtype_name + "_")  # bool_
        a = arrays[name] if rank == 0 else mx.zeros(shape, dtype=dtype)
        wire = {2: mx.uint16, 4: mx.uint32, 8: mx.uint64}.get(dtype.size)
        as_bits = mx.issubdtype(dtype, mx.inexact) and wire is not None
        summed = mx.distributed.all_sum(mx.view(a, wire) if as_bits else a, stream=mx.cpu)
        summed = mx.view(summed, dtype) if as_bits else summed
        mx.eval(summed)
        out[name] = a if rank == 0 else summed
    return out


def _broadcast_torch(header: list, arrays: dict | None, rank: int, backend: Any) -> dict:
    import torch
    import torch.distributed as dist
    device, out = _torch_device(backend), {}
    for name, shape, dtype_name in header:
        dtype = getattr(torch, dtype_name)
        t = arrays[name].to(device) if rank == 0 else torch.zeros(shape, dtype=dtype, device=device)
        dist.broadcast(t, src=0)
        out[name] = arrays[name] if rank == 0 else t.cpu()  # the codec's arrays live on the CPU
    return out


def barrier(backend: Any) -> None:
    """Wait until every rank gets here (before exiting: a rank 0 that fails while writing
    the adapter makes the others fail too, instead of reporting success)."""
    if world_of(backend)[1] > 1:
        with peer_guard(backend):
            all_sum_ints([1], backend)


# -- decisions taken on rank 0 ------------------------------------------------------

def launched_world() -> tuple[int, str]:
    """How many ranks a launcher started this process among (1 when none), and which."""
    env = os.environ
    if "MLX_RANK" in env:  # mlx.launch: MLX_WORLD_SIZE (nccl) or the ring's host file
        if env.get("MLX_WORLD_SIZE", "").isdigit():
            return int(env["MLX_WORLD_SIZE"]), "mlx.launch"
        try:
            ring = json.loads(Path(env.get("MLX_HOSTFILE", "")).read_text())
        except (OSError, ValueError):
            ring = []  # `mlx.launch -n 1` writes an empty host file
        return max(len(ring) if isinstance(ring, list) else 1, 1), "mlx.launch"
    if "TORCHELASTIC_RUN_ID" in env or {"RANK", "WORLD_SIZE"} <= set(env):
        return int(env.get("WORLD_SIZE", "1") or 1), "torchrun"
    return 1, ""


def check_world(spec: Spec, world_size: int, backend_name: str = "") -> None:
    """Fail in the first second, on every rank alike, when the launch and the spec do not
    fit: a launcher's ranks that the backend cannot see (each would train alone and
    overwrite the others' output), or a batch that the ranks cannot share."""
    launched, launcher = launched_world()
    if launched > 1 and world_size <= 1:
        hint = ("add --backend torch: torchrun runs the PyTorch backend (MLX runs start with "
                "mlx.launch)" if launcher == "torchrun" else
                "use --backend mlx (or auto): mlx.launch runs the MLX backend (PyTorch runs "
                "start with torchrun)")
        raise SpecError(f"this process is one of {launched} ranks started by {launcher}, but "
                        f"the {backend_name or 'chosen'} backend sees a single process: {hint}")
    if world_size <= 1:
        return
    if spec.batch_size % world_size:
        raise SpecError(f"batch_size={spec.batch_size} cannot be split evenly across "
                        f"{world_size} data-parallel ranks: use a multiple of {world_size} "
                        "(batch_size is the global batch, summed over all ranks)")
    per_rank, ga = spec.batch_size // world_size, spec.gradient_accumulation_steps
    if isinstance(ga, int) and per_rank % ga:
        raise SpecError(f"batch_size={spec.batch_size} over {world_size} ranks is {per_rank} "
                        f"per rank, which gradient_accumulation_steps={ga} does not divide")


def share_resume_point(backend: Any, loaded: Loaded | None, output_dir: Path, spec: Spec,
                       log: Callable[[str], None]) -> Loaded | None:
    """Every rank gets rank 0's resume decision and, when it resumes, rank 0's checkpoint.

    Rank 0 found and validated the checkpoint (the others have ``loaded=None``). Its meta
    and arrays are broadcast, so the other ranks never read ``output_dir``: it only has to
    exist on rank 0's machine. A checkpoint written by a run with another number of ranks
    resumes as well: its state (data position, RNG, monitors) is the global run's."""
    rank, world = world_of(backend)
    if rank == 0 and loaded is not None:
        saved = loaded.meta.get("world_size", 1)
        if saved != world:
            log(f"checkpoint step {loaded.step} was written by a {saved}-rank run; continuing "
                f"on {world} rank{'s' * (world > 1)} with the same global batch of "
                f"{spec.batch_size}")
    if world <= 1:
        return loaded
    with peer_guard(backend):
        head = broadcast_json(None if rank != 0 or loaded is None else
                              {"path": str(loaded.path), "step": loaded.step,
                               "meta": loaded.meta}, backend)
        if head is None:
            return None
        arrays = broadcast_arrays(loaded.arrays if rank == 0 else None, backend)
    if rank == 0:
        return loaded
    return Loaded(path=Path(head["path"]), step=head["step"], arrays=arrays, meta=head["meta"])


def broadcast_flag(flag: bool, backend: Any) -> bool:
    """Rank 0's ``flag`` on every rank."""
    rank, world = world_of(backend)
    if world <= 1:
        return flag
    with peer_guard(backend):
        return bool(all_sum_ints([int(bool(flag)) if rank == 0 else 0], backend)[0])


def agree(decision: StopDecision | None, interrupted: str | None,
          backend: Any) -> tuple[StopDecision | None, str | None]:
    """One collective at a report boundary: rank 0's stop decision, and whether any rank
    was asked to stop by a signal, become every rank's, so all stop after the same step.

    The other ranks get the rule and step, and a reason saying it came from rank 0."""
    rank, world = world_of(backend)
    if world <= 1:
        return decision, interrupted
    mine = [0, 0, int(interrupted is not None)]
    if rank == 0 and decision is not None:
        mine[:2] = [_RULES.index(decision.rule) + 1, decision.step]
    with peer_guard(backend):
        rule, step, signalled = all_sum_ints(mine, backend)
    if rank != 0:
        decision = (StopDecision(_RULES[rule - 1], f"rank 0 stopped the run "
                                 f"({_RULES[rule - 1]})", step) if rule else None)
    if signalled and interrupted is None:
        interrupted = "a signal on another rank"
    return decision, interrupted


def broadcast_stop(decision: StopDecision | None, backend: Any) -> StopDecision | None:
    """Rank 0's early-stopping decision on every rank."""
    return agree(decision, None, backend)[0]


# -- dead and hung peers ------------------------------------------------------------

def is_peer_failure(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(m in text for m in PEER_FAILURE_MARKERS)


def _die(message: str) -> None:
    sys.stdout.flush()
    print(f"mlx-tune: error: {message}", file=sys.stderr, flush=True)


@contextmanager
def peer_guard(backend: Any) -> Iterator[None]:
    """Turn "the other end of a collective is gone" into one line and EXIT_PEER_LOST."""
    rank, world = world_of(backend)
    try:
        yield
    except Exception as e:
        if world <= 1 or not is_peer_failure(e):
            raise
        _die(f"rank {rank}/{world}: lost contact with another rank ({str(e).strip()}); "
             f"stopping without a final save (the last checkpoint is intact): {RESUME_HINT}")
        raise SystemExit(EXIT_PEER_LOST) from None


def timeout_from_env() -> float:
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    try:
        return float(raw) if raw else DEFAULT_TIMEOUT
    except ValueError:
        raise SpecError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds") from None


class Watchdog:
    """Ends the process when no step finishes for ``timeout`` seconds.

    A collective waits forever for a peer that hangs without closing its sockets (a
    frozen machine, a stopped process, a network partition), and it cannot be
    interrupted from Python. This thread can: it needs no GIL while MLX or torch wait.
    Armed by the first ``beat`` (model loading and the first compile do not count), so
    the timeout must exceed the longest pause between steps: an evaluation, a checkpoint
    save on rank 0, sample generation."""

    def __init__(self, rank: int, world: int, timeout: float | None = None,
                 exit: Callable[[int], Any] = os._exit):
        self.rank, self.world, self._exit = rank, world, exit
        self.timeout = timeout_from_env() if timeout is None else timeout
        self._last: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def beat(self) -> None:
        self._last = time.monotonic()

    def __enter__(self) -> "Watchdog":
        if self.world > 1 and self.timeout > 0:
            self._thread = threading.Thread(target=self._watch, name="mlx-tune-watchdog",
                                            daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(min(max(self.timeout / 10, 0.05), 5.0)):
            last = self._last
            if last is not None and time.monotonic() - last > self.timeout:
                _die(f"rank {self.rank}/{self.world}: no training step finished in "
                     f"{self.timeout:g} s: another rank is hung or unreachable ({TIMEOUT_ENV}"
                     f"={self.timeout:g}; 0 disables); {RESUME_HINT}")
                self._exit(EXIT_PEER_LOST)
                return


@contextmanager
def guard_run(backend: Any) -> Iterator[Watchdog]:
    """The training run of one rank: peer failures exit cleanly, hangs are timed out.
    With one process the watchdog never starts and ``beat`` costs an attribute write."""
    rank, world = world_of(backend)
    with peer_guard(backend), Watchdog(rank, world) as watchdog:
        yield watchdog


def all_sum_packed(tree: Any, *scalars: Any) -> tuple:
    """MLX: all_sum a tree of arrays and some scalars in ONE collective (float32 on the
    wire): ``grads, loss_sum, ntok = all_sum_packed(grads, loss_sum, ntok)``.

    Why one: with three or more all_sums pending in a graph, a peer that dies makes
    MLX 0.32's ring backend hang instead of raising "connection to a peer was lost"
    (measured: 56 separate all_sums hung in every trial, one packed all_sum raised in
    every trial). It is also one network round trip per step instead of one per tensor.
    Costs a float32 copy of the gradients while the step runs."""
    import mlx.core as mx
    from mlx.utils import tree_map

    leaves: list = []
    tree_map(leaves.append, tree)
    parts = [g.astype(mx.float32).reshape(-1) for g in leaves]
    parts += [mx.array(s).astype(mx.float32).reshape(-1) for s in scalars]
    flat = mx.distributed.all_sum(mx.concatenate(parts))
    offsets = np.cumsum([0] + [g.size for g in leaves]).tolist()
    pieces = iter([flat[a:b].reshape(g.shape).astype(g.dtype)
                   for a, b, g in zip(offsets, offsets[1:], leaves)])
    summed = tree_map(lambda _: next(pieces), tree)
    end = offsets[-1]
    return (summed, *(flat[end + i].astype(mx.array(s).dtype) for i, s in enumerate(scalars)))


def shard_rows(batch: Any, rank: int, world: int) -> Any | None:
    """This rank's rows of an evaluation batch (None when it gets none): validation is
    split like training, and the sums are added up across ranks by the backend."""
    from mlx_tune.data.batch import Batch
    if world <= 1:
        return batch
    tokens = np.array_split(batch.tokens, world)[rank]
    return Batch(tokens, np.array_split(batch.mask, world)[rank]) if len(tokens) else None
