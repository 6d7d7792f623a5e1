"""TrainStream: the endless training iterator, with optional background prefetch.

The stream's state is the position *after the last batch handed out*, never the producer's
position: prefetched batches that were not handed out are simply produced again after a
resume. Log lines produced with a batch (epoch filter counts) are emitted on the caller's
thread when that batch is handed out, so a reporter never sees calls from the worker.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, Iterator, Optional

from mlx_tune.data.batch import Batch

STATE_VERSION = 1


class _Failure:
    """An exception raised by the producer, carried to the consumer."""

    def __init__(self, error: BaseException):
        self.error = error


class TrainStream:
    """``next_batch()`` forever; ``state_dict()``/``load_state_dict()`` resume exactly."""

    def __init__(self, source, prefetch: int = 0, log: Callable[[str], None] = print,
                 seed: int = 0, widths=None):
        self._source = source
        self._prefetch = max(0, int(prefetch))
        self._log = log
        self._seed = seed
        self._widths = widths  # data.widths.Widths: saved with the position, restored first
        self._state: dict = {"epoch": 0, "position": 0}
        self._gen: Optional[Iterator] = None
        self._thread: Optional[threading.Thread] = None
        self._queue: Optional[queue.Queue] = None
        self._stop: Optional[threading.Event] = None
        self._failure: Optional[BaseException] = None

    # -- position ------------------------------------------------------------
    @property
    def epoch(self) -> int:
        """The epoch of the last batch handed out (0 before the first)."""
        return int(self._state["epoch"])

    @property
    def position(self) -> int:
        """Batches handed out so far in the current epoch."""
        return int(self._state["position"])

    @property
    def mode(self) -> str:
        return self._source.mode

    @property
    def source(self):
        """The source batches come from (a MemorySource's ``examples`` are every
        training row, which the precomputed reference scores before step 0)."""
        return self._source

    def steps_per_epoch(self) -> int:
        """Optimizer steps in one pass over the training data (num_epochs -> max_steps)."""
        return self._source.steps_per_epoch()

    def state_dict(self) -> dict:
        """JSON-able position of the stream after the last batch handed out."""
        state = {"version": STATE_VERSION, "mode": self.mode, "seed": self._seed,
                 "records": getattr(self._source, "records", None), **self._state}
        if self._widths is not None:
            state["widths"] = self._widths.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where the stream that saved ``state`` stopped."""
        self._shutdown()
        self._failure = None
        epoch = int(state.get("epoch", 0))
        if self._widths is not None and state.get("widths"):
            # The same shapes as the run that saved this: no new compiled traces on resume.
            line = self._widths.load_state_dict(state["widths"])
            if line:
                self._log(line)
        if state.get("mode", self.mode) != self.mode:
            # Positions of the two modes mean different things: restart the epoch.
            self._log(f"data position was saved with {state.get('mode')} data loading, now "
                      f"{self.mode}: resuming at the start of epoch {epoch}")
            self._state = {"epoch": epoch, "position": 0}
            return
        records = getattr(self._source, "records", None)
        if state.get("records") not in (None, records):
            self._log(f"train data has {records} records, {state.get('records')} when this "
                      "position was saved: the batch order from here differs from that run")
        if state.get("seed", self._seed) != self._seed:
            self._log(f"data position was saved with seed {state.get('seed')}, now "
                      f"{self._seed}: the batch order from here differs from that run")
        self._state = {k: v for k, v in state.items()
                       if k not in ("version", "mode", "seed", "records", "widths")}

    # -- batches -------------------------------------------------------------
    def next_batch(self) -> Batch:
        if self._failure is not None:
            raise self._failure
        if self._widths is not None and self._widths.chooser is not None:
            self._widths.values  # streaming: choose (and log) here, never on the worker
        if self._prefetch == 0:
            if self._gen is None:
                self._gen = self._source.iterate(dict(self._state))
            try:
                batch, state, messages = next(self._gen)
            except BaseException:
                self._gen = None  # the next call restarts from the last good position
                raise
        else:
            if self._thread is None:
                self._start()
            item = self._queue.get()
            if isinstance(item, _Failure):
                self._failure = item.error
                self._shutdown()
                raise item.error
            batch, state, messages = item
        for line in messages:
            self._log(line)
        self._state = state
        return batch

    def __iter__(self) -> "TrainStream":
        return self

    def __next__(self) -> Batch:
        return self.next_batch()

    # -- prefetch thread -----------------------------------------------------
    def _start(self) -> None:
        self._queue = queue.Queue(maxsize=self._prefetch)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._produce, args=(self._source.iterate(dict(self._state)), self._queue,
                                        self._stop),
            name="mlx-tune-prefetch", daemon=True)
        self._thread.start()

    @staticmethod
    def _produce(gen: Iterator, q: queue.Queue, stop: threading.Event) -> None:
        def put(item) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.05)
                    return True
                except queue.Full:
                    continue
            return False

        try:
            for item in gen:
                if not put(item):
                    return
        except BaseException as e:  # surfaced by next_batch(), with its message
            put(_Failure(e))
        finally:
            gen.close()

    def _shutdown(self) -> None:
        if self._gen is not None:
            self._gen.close()
            self._gen = None
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=10)
            self._thread, self._queue, self._stop = None, None, None

    def close(self) -> None:
        """Stop the prefetch thread (if any) and release the data files."""
        self._shutdown()

    def __del__(self) -> None:
        # The worker holds no reference to the stream, so a forgotten stream still stops
        # it. No join here: at interpreter exit a daemon thread may never answer one.
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()

    def __enter__(self) -> "TrainStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
