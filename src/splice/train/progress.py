"""What a run shows while it runs: the progress line on stderr, and the loss and throughput window behind each
metrics line."""

from __future__ import annotations

import sys
import time


def clock(s: float) -> str:
    s = max(0, int(s))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Progress:
    """One line on stderr: rewritten in place on a terminal, printed every 10% otherwise."""

    def __init__(self, enabled: bool, max_steps: int | None, budget_s: float | None, stream=None):
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = enabled and getattr(self.stream, "isatty", lambda: False)()
        self.max_steps, self.budget_s = max_steps, budget_s
        self._last_draw = 0.0
        self._last_decile = -1
        self._width = 0

    def fraction(self, step: int, elapsed: float) -> float:
        f = [step / self.max_steps] if self.max_steps else []
        f += [elapsed / self.budget_s] if self.budget_s else []
        return min(1.0, max(f)) if f else 0.0

    def update(self, step: int, elapsed: float, loss: float | None, lr: float, rate: float, force: bool = False) -> None:
        if not self.enabled:
            return
        frac = self.fraction(step, elapsed)
        now = time.monotonic()
        if self.tty:
            if not force and now - self._last_draw < 0.25:
                return
        else:
            decile = int(frac * 10)
            if not force and decile == self._last_decile:
                return
            self._last_decile = decile
        self._last_draw = now
        bar = "#" * int(frac * 20)
        steps = f"{step}/{self.max_steps}" if self.max_steps else f"{step}"
        left = elapsed / frac - elapsed if frac > 0 else 0.0
        loss_s = f"{loss:.4f}" if loss is not None else "-"
        line = (f"step {steps} {frac:4.0%} |{bar:<20}| loss {loss_s} lr {lr:.2e} {rate:,.0f} samples/s "
                f"{clock(elapsed)} elapsed, {clock(left)} left")
        if self.tty:
            pad = max(0, self._width - len(line))
            self.stream.write("\r" + line + " " * pad)
            self._width = len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def write(self, message: str) -> None:
        """A line of its own (stdout), clearing the progress line first on a terminal."""
        if self.tty and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._width = 0
        print(message, flush=True)

    def close(self) -> None:
        if self.tty and self._width:
            self.stream.write("\n")
            self.stream.flush()
        self._width = 0


class Window:
    """Loss and throughput since the last metrics line."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.loss, self.tokens, self.samples, self.t = 0.0, 0, 0, time.perf_counter()

    def add(self, loss: float, tokens: float, samples: int) -> None:
        self.loss += loss * tokens
        self.tokens += int(tokens)
        self.samples += samples

    def mean(self) -> float:
        return self.loss / max(self.tokens, 1)

    def rate(self) -> float:
        return self.samples / max(time.perf_counter() - self.t, 1e-9)

