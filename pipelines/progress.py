"""Live progress for `beam run curate` / `beam run select` on the local runner.

Fed by the pipeline's own Beam counters (the `kept` / `dropped_<reason>`
counters every stage names once, `shards/samples`, `select/records_read`), so
it adds nothing per element. A daemon thread polls, every `interval` seconds,
the counters of the bundles the in-process SDK workers are running (what a
runner's progress request returns: `BundleProcessor.monitoring_infos()`), adds
the last values seen of bundles that have finished, and shows:

    rows read, fetched (of the rows that reach the crawl), kept, rejected,
    images/s over the fetches, and an ETA for the crawl

- on a terminal: one line refreshed in place (a `rich` progress bar);
- otherwise: one log line every `log_interval` seconds (default 30).

When the run ends, the last line shows the run's committed counters
(`PipelineResult.metrics()`), which are exact.

Where it works: Beam's local `FnApiRunner` in `in_memory` (the default) and
`multi_threading` modes, whose SDK workers run in this process. Beam's
FnApiRunner has no public hook for in-flight counters, so `track_bundles`
registers the bundle-processor caches the in-process workers create (by
substituting a registering subclass for `sdk_worker.BundleProcessorCache` for
the duration of the run); if Beam changes that class, progress degrades to the
final line and the run is unaffected. In `multi_processing` mode the workers are
other processes and only the final line is shown. On Dataflow and Flink the
same counters appear in the runner's own UI (see the README).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
import weakref
from dataclasses import dataclass

LOG = logging.getLogger(__name__)


@dataclass
class Counts:
    """What the progress line shows; every field a sum of Beam counters."""

    read: int = 0  # rows read from the input (read stage kept + dropped), or records read back (select)
    to_fetch: int = 0  # rows that passed the cheap checks and go to the crawl
    fetch_done: int = 0  # crawl attempts finished (fetched or dropped)
    fetched: int = 0
    kept: int = 0  # samples written to shards
    rejected: int = 0  # every dropped_<reason> counter

    @classmethod
    def from_counters(cls, counters: dict[tuple[str, str], int]) -> Counts:
        def total(namespace: str, prefix: str = "") -> int:
            return sum(v for (ns, name), v in counters.items() if ns == namespace and name.startswith(prefix))

        dropped = sum(v for (_, name), v in counters.items() if name.startswith("dropped_"))
        read = total("read", "kept") + total("read", "dropped_") + counters.get(("select", "records_read"), 0)
        return cls(
            read=read,
            to_fetch=counters.get(("caption", "kept"), 0),
            fetch_done=total("crawl", "kept") + total("crawl", "dropped_"),
            fetched=counters.get(("crawl", "kept"), 0),
            kept=counters.get(("shards", "samples"), 0),
            rejected=dropped,
        )

    def line(self) -> str:
        return f"read {self.read}  fetched {self.fetched}  kept {self.kept}  rejected {self.rejected}"


def _user_counters(monitoring_infos) -> dict[tuple[str, str], int]:
    from apache_beam.runners.portability import portable_metrics

    counters, *_ = portable_metrics.from_monitoring_infos(monitoring_infos, user_metrics_only=True)
    totals: dict[tuple[str, str], int] = {}
    for key, value in counters.items():
        name = (key.metric.namespace, key.metric.name)
        totals[name] = totals.get(name, 0) + int(value)
    return totals


def result_counters(result) -> dict[tuple[str, str], int]:
    """(namespace, name) -> committed value of every user counter of a finished run."""
    totals: dict[tuple[str, str], int] = {}
    try:
        for counter in result.metrics().query()["counters"]:
            name = (counter.key.metric.namespace, counter.key.metric.name)
            totals[name] = totals.get(name, 0) + int(counter.committed or 0)
    except Exception as err:  # a runner without metrics: nothing to show
        LOG.debug("no metrics from the runner: %s", err)
    return totals


_CACHES: weakref.WeakSet = weakref.WeakSet()


@contextlib.contextmanager
def track_bundles():
    """Register the bundle-processor caches in-process SDK workers create while
    the block runs (see the module docstring)."""
    try:
        from apache_beam.runners.worker import sdk_worker

        original = sdk_worker.BundleProcessorCache

        class _RegisteringCache(original):
            """Registers itself, and keeps the counters of each bundle it
            releases (a finished bundle's processor is reset on release)."""

            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                self.progress_lock = threading.Lock()
                self.finished_counters: dict[tuple[str, str], int] = {}
                _CACHES.add(self)

            def release(self, instruction_id):
                entry = self.active_bundle_processors.get(instruction_id)
                if entry is not None:
                    try:
                        counters = _user_counters(entry[1].monitoring_infos())
                    except Exception as err:  # never break the bundle
                        LOG.debug("progress: %s", err)
                        counters = {}
                    with self.progress_lock:
                        for name, value in counters.items():
                            self.finished_counters[name] = self.finished_counters.get(name, 0) + value
                        super().release(instruction_id)
                    return
                super().release(instruction_id)

    except Exception as err:  # pragma: no cover - a Beam without this class
        LOG.debug("live progress unavailable: %s", err)
        yield
        return
    sdk_worker.BundleProcessorCache = _RegisteringCache
    try:
        yield
    finally:
        sdk_worker.BundleProcessorCache = original


class LiveCounters:
    """Sums the user counters of the bundles finished and running in this
    process's SDK workers (those created inside `track_bundles`)."""

    def poll(self) -> dict[tuple[str, str], int]:
        totals: dict[tuple[str, str], int] = {}

        def add(counters):
            for name, value in counters.items():
                totals[name] = totals.get(name, 0) + value

        for cache in list(_CACHES):
            # Under the lock a bundle is either still active or already in
            # finished_counters, never both and never neither.
            with cache.progress_lock:
                add(cache.finished_counters)
                running = [entry[1] for entry in list(cache.active_bundle_processors.values())]
                for processor in running:
                    try:
                        add(_user_counters(processor.monitoring_infos()))
                    except Exception as err:  # a bundle that failed under us
                        LOG.debug("progress: %s", err)
        return totals


class Progress:
    """The display: a rich line on a terminal, log lines otherwise.

    Use as a context manager around `pipeline.run()`; call `finish(result)`
    with the finished result for the exact last line."""

    def __init__(self, title: str, interval: float = 0.5, log_interval: float = 30.0, stream=None, terminal: bool | None = None):
        self.title = title
        self.interval = interval
        self.log_interval = log_interval
        self.stream = stream or sys.stderr
        self.terminal = self.stream.isatty() if terminal is None else terminal
        self._live = LiveCounters()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = 0.0
        self._last_log = 0.0
        self._progress = None
        self._task = None
        self._tracking = None

    # -- display

    def _start_display(self) -> None:
        if not self.terminal:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self._progress = RichProgress(
            TextColumn("[bold]{task.description}"),
            BarColumn(bar_width=24),
            MofNCompleteColumn(),
            TextColumn("crawled"),
            TextColumn("{task.fields[counts]}"),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=Console(file=self.stream, force_terminal=True),
            refresh_per_second=4,
        )
        self._task = self._progress.add_task(self.title, total=None, counts="", rate="")
        self._progress.start()

    def _show(self, counts: Counts, final: bool = False) -> None:
        elapsed = max(time.monotonic() - self._started, 1e-9)
        rate = counts.fetch_done / elapsed
        if self._progress is not None:
            self._progress.update(
                self._task,
                completed=counts.fetch_done,
                total=counts.to_fetch or None,
                counts=counts.line(),
                rate=f"{rate:.1f} img/s",
            )
            return
        now = time.monotonic()
        if final or now - self._last_log >= self.log_interval:
            self._last_log = now
            remaining = max(counts.to_fetch - counts.fetch_done, 0)
            eta = f"{remaining / rate:.0f} s" if rate > 0 and counts.to_fetch else "?"
            status = "done" if final else f"{rate:.1f} img/s, ETA {eta}"
            print(f"{self.title}: {counts.line()}  ({elapsed:.0f} s, {status})", file=self.stream, flush=True)

    # -- lifecycle

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._show(Counts.from_counters(self._live.poll()))
            except Exception as err:  # progress must never break a run
                LOG.debug("progress: %s", err)

    def __enter__(self) -> Progress:
        self._started = self._last_log = time.monotonic()
        self._tracking = track_bundles()
        self._tracking.__enter__()
        self._start_display()
        self._thread = threading.Thread(target=self._loop, name="progress", daemon=True)
        self._thread.start()
        return self

    def finish(self, result) -> Counts:
        """Stop polling and show the run's committed counters."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        counts = Counts.from_counters(result_counters(result))
        self._show(counts, final=True)
        return counts

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        if self._tracking is not None:
            self._tracking.__exit__(*exc)
            self._tracking = None


def run_with_progress(pipeline, title: str, enabled: bool = True, log_interval: float = 30.0):
    """`pipeline.run()` to completion, with live progress when the runner is
    local; returns the PipelineResult."""
    from pipelines.runner import is_local_runner

    if not enabled or not is_local_runner(pipeline.options):
        result = pipeline.run()
        result.wait_until_finish()
        return result
    with Progress(title, log_interval=log_interval) as progress:
        result = pipeline.run()
        result.wait_until_finish()
        progress.finish(result)
    return result
