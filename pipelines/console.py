"""What a person sees while a run trains: a start line, the epoch table, progress within an epoch,
and a closing summary. Ray's own lines stay in Ray's log files unless run.verbose.

Rank 0 does not print: it sends its lines and progress to the driver through a Ray queue, and the
driver prints them (a worker's stdout reaches the console only through Ray's log forwarding,
which brings every other process's lines with it). Other kinds of message (rank 0's system
metrics) go to the Console's handlers.

    with Console(cfg.run.progress_s) as console:        # the driver: prints what arrives
        ... train_loop_config={"console": console.channel(), ...}
    say = WorkerConsole(config["console"])               # rank 0: say.line(text), say.step(images, waited)

On a terminal the progress is a bar (tqdm); otherwise a line every run.progress_s seconds.
"""
from __future__ import annotations

import sys
import threading
import time

# The epoch table: (metric in the worker's epoch row, heading, width, format), in order.
TABLE = [("epoch", "epoch", 5, "d"), ("lr", "lr", 8, ".4f"), ("train_loss", "train_loss", 10, ".4f"),
         ("train_error", "train_err", 9, ".2%"), ("val_error", "val_err", 8, ".2%"),
         ("val_top5_error", "val_top5", 8, ".2%"), ("images_per_s", "img/s", 7, ".0f"),
         ("data_wait", "wait", 5, ".0%"), ("workers", "workers", 7, "d"), ("epoch_time_s", "time", 6, ".1f")]


def header() -> str:
    return " ".join(f"{title:>{width}}" for _, title, width, _ in TABLE)


def table_row(row: dict) -> str:
    """One epoch's row; undecodable images, when there are any, are counted after it."""
    cells = [format(row[key], spec) + ("s" if key == "epoch_time_s" else "") for key, _, _, spec in TABLE]
    text = " ".join(f"{cell:>{width}}" for cell, (_, _, width, _) in zip(cells, TABLE))
    notes = [f"{row[k]:,} {what}" for k, what in (("train_skipped", "training images undecodable"),
                                                   ("val_skipped", "validation images undecodable"))
             if row.get(k)]
    return text + (f"  ({'; '.join(notes)}: data.bad_records=skip)" if notes else "")


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
    return f"{h} h {m:02d} min" if h else f"{m} min {s:02d} s" if m else f"{s} s"


def summary(epochs: int, seconds: float, final_error: float, best: tuple[float, int, str] | None, run_dir: str,
            run_name: str, mlflow_run_id: str, experiment: str, open_command: str, before: int = 0) -> str:
    """The closing lines: what was reached, where the checkpoints are, how to open the MLflow run.
    best: (validation error, epoch, checkpoint directory name) of the best checkpoint kept; before:
    the epochs the run had finished before this command, whose seconds count only its own epochs."""
    if not before:
        done = f"{epochs} epoch{'s' if epochs != 1 else ''} in {duration(seconds)}"
    elif epochs > before:
        done = (f"epoch {epochs}" if epochs == before + 1 else f"epochs {before + 1}..{epochs}") \
            + f" in {duration(seconds)} ({epochs} in all)"
    else:
        done = f"no epoch left to train ({before} trained before)"
    lines = [f"done: {done}; final val error {final_error:.2%}"
             + (f", best {best[0]:.2%} (epoch {best[1]})" if best else ""),
             f"checkpoints: {run_dir}" + (f" (best: {best[2]})" if best else "")
             + f"; resume or extend with the same run.name={run_name}",
             f"MLflow run {mlflow_run_id} in experiment {experiment}; to see it: {open_command}"]
    return "\n".join(lines)


class ConsoleView:
    """Prints the messages rank 0 sends: ("line", text) and ("progress", {...}). No Ray here."""

    def __init__(self, stream=None, tty: bool | None = None):
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty() if tty is None else tty
        self.bar, self.bar_epoch = None, None

    def handle(self, kind: str, payload) -> None:
        if kind == "line":
            self.close()
            print(payload, file=self.stream, flush=True)
        elif kind == "progress":
            if self.tty:
                try:
                    self._bar(payload)
                    return
                except Exception:  # no tqdm, or a terminal it cannot draw on: lines, as in a log file
                    self.tty = False
            print(progress_line(payload), file=self.stream, flush=True)

    def _bar(self, p: dict) -> None:
        from tqdm import tqdm
        if self.bar is None or self.bar_epoch != p["epoch"]:
            self.close()
            # the numbers are rank 0's, not tqdm's own timing: the bar starts mid-epoch
            self.bar_epoch = p["epoch"]
            self.bar = tqdm(total=p["total"], desc=f"epoch {p['epoch']}", leave=False, file=self.stream,
                            dynamic_ncols=True, bar_format="{desc} |{bar}|")
        self.bar.n = min(p["images"], p["total"])
        self.bar.set_description_str(progress_line(p).strip(), refresh=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def progress_line(p: dict) -> str:
    eta = (p["total"] - p["images"]) / p["rate"] if p["rate"] > 0 else float("nan")
    return (f"  epoch {p['epoch']}: {p['images']:,}/{p['total']:,} images ({p['images'] / max(p['total'], 1):.0%}), "
            f"{p['rate']:,.0f} img/s, data wait {p['wait']:.0%}, ETA {duration(eta) if eta == eta else '?'}")


class Console:
    """The driver's side: a Ray queue rank 0 writes to, and a thread printing what arrives."""

    def __init__(self, progress_s: float, stream=None, handlers: dict | None = None):
        self.view = ConsoleView(stream)
        self.handlers = handlers or {}  # kind -> what takes rank 0's other messages (system metrics)
        # a bar moves every second; a log line every progress_s
        self.interval = (1.0 if self.view.tty else progress_s) if progress_s > 0 else 0.0
        self.queue = None
        self.thread = None
        self.stopping = threading.Event()

    def channel(self) -> dict:
        """What rank 0 needs to reach this console (picklable: goes in train_loop_config)."""
        return {"queue": self.queue, "interval": self.interval}

    def __enter__(self) -> "Console":
        import ray
        from ray.util.queue import Queue
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
        # on this node: a queue on a worker node would end the run when that node is lost or preempted
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})
        self.thread = threading.Thread(target=self._pump, name="console", daemon=True)
        self.thread.start()
        return self

    def _pump(self) -> None:
        from ray.exceptions import RayError
        from ray.util.queue import Empty
        while not self.stopping.is_set():
            try:
                message = self.queue.get(timeout=0.5)
            except Empty:
                continue
            except RayError:  # the queue's actor is gone (Ray shutting down): nothing more will come
                return
            self.handle(*message)

    def handle(self, kind: str, payload) -> None:
        if kind in self.handlers:
            self.handlers[kind](payload)
        else:
            self.view.handle(kind, payload)

    def __exit__(self, *exc) -> None:
        from ray.exceptions import RayError
        self.stopping.set()
        self.thread.join(timeout=5)
        try:
            while not self.queue.empty():  # rank 0's puts have all landed once fit() returned
                self.handle(*self.queue.get_nowait())
            self.queue.shutdown(force=True)
        except RayError:  # Ray went down with the run: what was left in the queue went with it
            pass
        self.view.close()


class WorkerConsole:
    """Rank 0's side: lines, and progress within an epoch at the console's interval. On other ranks,
    or without a channel (tests driving the loop directly), it prints lines itself."""

    def __init__(self, channel: dict | None, enabled: bool = True):
        self.queue = channel["queue"] if channel else None
        self.interval = channel["interval"] if channel else 0.0
        self.tag = channel.get("tag", "") if channel else ""  # a sweep's trial: its run name
        self.enabled = enabled
        self.epoch, self.total, self.start, self.last, self.waited = 0, 0, 0.0, 0.0, 0.0

    def line(self, text: str) -> None:
        if not self.enabled:
            return
        if not text.startswith(self.tag):
            text = self.tag + text
        if self.queue is None:
            print(text, flush=True)
        else:
            self.queue.put(("line", text))

    def send(self, kind: str, payload) -> None:
        """Anything else for the driver (a Console handler of that kind takes it); without a queue, nothing."""
        if self.enabled and self.queue is not None:
            self.queue.put((kind, payload))

    def start_epoch(self, epoch: int, total: int) -> None:
        self.epoch, self.total = epoch, total
        self.start = self.last = time.perf_counter()

    def step(self, images: int, waited: float) -> None:
        """After a step: images so far this epoch (all workers), seconds spent waiting for input (this one)."""
        if not (self.enabled and self.queue is not None and self.interval):
            return
        now = time.perf_counter()
        if now - self.last < self.interval:
            return
        self.last = now
        elapsed = now - self.start
        self.queue.put(("progress", {"epoch": self.epoch, "images": images, "total": self.total,
                                     "rate": images / elapsed if elapsed > 0 else 0.0,
                                     "wait": waited / elapsed if elapsed > 0 else 0.0}))
