"""Live progress of a long run: round, agents online, bytes and joules.

`Progress(total_rounds, online=fn, books=fn)` is an `on_round` callback for `Coordinator`. On a terminal it
draws a `rich.live` panel that refreshes a few times a second (so "agents online" moves between rounds);
otherwise (CI logs, pipes) it prints one plain line per round. `online()` returns (online, roster size) and
`books(round=None)` the ledger's numbers (`fedfleet.coordinator.records.accounts`: the run's, or one round's),
so the line and the panel show what summary.json, the report and the metrics show, each labelled: the
round's model-update bytes and refusals, and the run's device traffic and energy so far ("not recorded"
without a meter). Both are optional and must be cheap and thread-safe.
Use it as a context manager (or `start()` / `stop()`) so the live panel is closed on errors.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from fedfleet.coordinator.engine.rounds import RoundSummary
from fedfleet.coordinator.records.accounts import Accounts


class Progress:
    def __init__(self, total_rounds: int, *, title: str = "fedfleet", online: Callable[[], tuple[int, int]] | None = None,
                 books: Callable[..., Accounts] | None = None, quiet: bool = False, console: Console | None = None,
                 live: bool | None = None) -> None:
        self.console = console or Console(highlight=False)
        self.total = total_rounds
        self.title = title
        self.online_fn = online
        self.books_fn = books
        self.quiet = quiet
        self.live = (self.console.is_terminal if live is None else live) and not quiet
        self.t0 = time.perf_counter()
        self.summaries: list[RoundSummary] = []
        self.bytes_up = 0
        self.bytes_down = 0
        self._live: Live | None = None

    # -------------------------------------------------------------- lifecycle
    def start(self) -> Progress:
        if self.live and self._live is None:
            self._live = Live(self, console=self.console, refresh_per_second=4, transient=False)
            self._live.start()
        return self

    def stop(self) -> None:
        if self._live is not None:
            self._live.refresh()
            self._live.stop()
            self._live = None

    def __enter__(self) -> Progress:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -------------------------------------------------------------- state
    def _online(self) -> tuple[int, int] | None:
        try:
            return self.online_fn() if self.online_fn is not None else None
        except Exception:  # noqa: BLE001 - a view must never break the run
            return None

    def _books(self, round: int | None = None) -> Accounts | None:
        try:
            return self.books_fn(round) if self.books_fn is not None else None
        except Exception:  # noqa: BLE001 - a view must never break the run
            return None

    def __call__(self, s: RoundSummary) -> None:
        self.summaries.append(s)
        self.bytes_up += s.bytes_up
        self.bytes_down += s.bytes_down
        if self.quiet or self._live is not None:
            return
        self.console.print(self.line(s), soft_wrap=True)

    score_name = "acc"  # what a round's score is: "acc", or "x0 MSE" for the diffusion task (NaN: not evaluated)

    def line(self, s: RoundSummary) -> str:
        """The plain one-line form of a round (also what logs get)."""
        online, run, rnd = self._online(), self._books(), self._books(s.round)
        score = "-" if s.accuracy != s.accuracy else f"{s.accuracy:.3f}"
        parts = [f"round {s.round:>3}/{self.total}", f"{self.score_name} {score}"]
        if s.accuracy_min is not None:  # per-node models (MoNNA): accuracy is the mean over the nodes
            parts.append(f"(mean of {s.nodes} nodes, worst {s.accuracy_min:.3f})")
        if online is not None:
            parts.append(f"online {online[0]}/{online[1]}")
        rejected = rnd.refusals if rnd is not None else s.rejected
        up, down = rnd.updates if rnd is not None else (s.bytes_up, s.bytes_down)
        parts += [f"ok {s.ok}/{s.selected}", f"late {s.late}", f"rejected {rejected}",
                  f"updates up {up / 1e6:.3f} MB down {down / 1e6:.3f} MB"]
        if run is not None:
            parts += [f"run: device traffic {sum(run.all) / 1e6:.3f} MB", energy_text(run)]
        parts.append(f"{s.wall_s:5.2f} s [{time.perf_counter() - self.t0:6.1f} s]")
        if s.note:
            parts.append(s.note)
        return "  ".join(parts)

    # -------------------------------------------------------------- live panel
    def __rich__(self) -> Any:
        last = self.summaries[-1] if self.summaries else None
        online, run = self._online(), self._books()
        t = Table(title=f"{self.title}  [{time.perf_counter() - self.t0:6.1f} s]", show_header=False, box=None)
        t.add_column(style="bold")
        t.add_column()
        t.add_row("round", f"{len(self.summaries)}/{self.total}")
        t.add_row("accuracy" if self.score_name == "acc" else self.score_name,
                  f"{last.accuracy:.4f}" if last and last.accuracy == last.accuracy else "-")
        t.add_row("agents online", f"{online[0]}/{online[1]}" if online else "-")
        if last:
            t.add_row("last round", f"ok {last.ok}/{last.selected}  late {last.late}  rejected {last.rejected}  "
                                    f"{last.wall_s:.2f} s")
            if last.note:
                t.add_row("method", last.note)
        if run is not None:
            up, down = run.updates
            t.add_row("model updates", f"up {up / 1e6:.3f} MB  down {down / 1e6:.3f} MB (run)")
            t.add_row("device traffic", f"{sum(run.all) / 1e6:.3f} MB (run, every category)")
            t.add_row("energy", energy_text(run))
        else:
            t.add_row("model updates", f"up {self.bytes_up / 1e6:.3f} MB  down {self.bytes_down / 1e6:.3f} MB")
        bar = ProgressBar(total=max(1, self.total), completed=len(self.summaries), width=40)
        return Group(t, bar, Text(""))


def energy_text(books: Accounts) -> str:
    """The run's energy as the views show it: joules with compute (the learning) apart, or "not recorded"."""
    if books.energy is None:
        return "energy not recorded"
    return f"energy {books.joules:.1f} J (compute {books.energy['compute_j']:.1f} J)"


def summary_table(rows: dict[str, Any], title: str) -> Table:
    """A two-column table of final numbers, for the end of a run."""
    t = Table(title=title, show_header=False)
    t.add_column(style="bold")
    t.add_column()
    for k, v in rows.items():
        t.add_row(k, f"{v:.4g}" if isinstance(v, float) else str(v))
    return t
