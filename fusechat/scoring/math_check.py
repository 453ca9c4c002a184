"""Math answers: the response's final answer against the gold answer, through math-verify.

math-verify extracts the final answer (the last \\boxed{} first, then other LaTeX or plain
expressions; boxes only a separator apart, "\\boxed{1}, \\boxed{2}", read as one list answer) and
compares it symbolically. Its own timeouts use signals, which fail outside the
main thread (Prefect runs tasks in threads), so they are switched off and each check runs in a
worker process instead: a worker that has not answered within `timeout_s` is killed and replaced,
and the check is recorded as `timeout`.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
from dataclasses import dataclass

# the statuses this module writes to scores.parquet `check_status`: fusechat.tables.MATH_STATUSES


@dataclass
class MathResult:
    status: str
    detail: str  # the extracted answer, or why there is none


def check_answer(gold: str, response: str) -> MathResult:
    """One check in the current process (no time bound: call it through MathChecker)."""
    from math_verify import parse, verify

    # a gold answer is a bare expression ("27", "\\frac{1}{2}"); boxing it makes the LaTeX
    # extractor read it whole instead of guessing where the expression starts
    gold_parsed = parse(f"\\boxed{{{gold}}}", parsing_timeout=None)
    if not gold_parsed:
        return MathResult("error", f"gold answer could not be parsed: {gold[:200]!r}")
    pred = parse(response, parsing_timeout=None)
    if not pred:
        return MathResult("unparseable", "no final answer found in the response")
    ok = verify(gold_parsed, pred, timeout_seconds=None)
    return MathResult("correct" if ok else "incorrect", str(pred[-1])[:500])


def _worker(conn) -> None:
    import logging

    # math-verify logs a warning on every call made with its timeouts switched off
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    import importlib

    importlib.import_module("math_verify")  # pay for the import before announcing readiness

    conn.send("ready")
    while True:
        try:
            gold, response = conn.recv()
        except EOFError:
            return
        try:
            conn.send(check_answer(gold, response))
        except Exception as e:  # math-verify raising on odd input must not end the worker
            conn.send(MathResult("error", f"{type(e).__name__}: {e}"[:500]))


class MathChecker:
    """`workers` processes checking in parallel, each check bounded by `timeout_s`."""

    def __init__(self, workers: int = 2, timeout_s: float = 5.0):
        self.timeout_s = timeout_s
        # spawn, not fork: the scorer process may hold threads and torch state
        self._ctx = mp.get_context("spawn")
        self._slots = [self._start() for _ in range(workers)]
        self._idle: queue.Queue[int] = queue.Queue()
        for slot in range(workers):
            self._idle.put(slot)

    def _start(self):
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(target=_worker, args=(child,), daemon=True)
        proc.start()
        child.close()
        if not parent.poll(120) or parent.recv() != "ready":
            proc.kill()
            raise RuntimeError("math check worker did not start (is math-verify installed?)")
        return proc, parent

    def _restart(self, slot: int) -> None:
        proc, conn = self._slots[slot]
        proc.kill()
        proc.join()
        conn.close()
        self._slots[slot] = self._start()

    def _check(self, slot: int, gold: str, response: str) -> MathResult:
        proc, conn = self._slots[slot]
        conn.send((gold, response))
        if conn.poll(self.timeout_s):
            try:
                return conn.recv()
            except EOFError:
                self._restart(slot)
                return MathResult("error", "math check worker died")
        self._restart(slot)
        return MathResult("timeout", f"no verdict within {self.timeout_s:g}s")

    def check(self, gold: str, response: str) -> MathResult:
        """One bounded check on whichever worker is free; safe to call from several threads."""
        slot = self._idle.get()
        try:
            return self._check(slot, gold, response)
        finally:
            self._idle.put(slot)

    def check_many(self, items: list[tuple[str, str]], progress=None) -> list[MathResult]:
        """(gold, response) pairs -> results, in order; `progress()` is called once per item."""
        from concurrent.futures import ThreadPoolExecutor

        def one(item: tuple[str, str]) -> MathResult:
            result = self.check(*item)
            if progress:
                progress()
            return result

        with ThreadPoolExecutor(len(self._slots)) as ex:
            return list(ex.map(one, items))

    def close(self) -> None:
        for proc, conn in self._slots:
            conn.close()
            proc.kill()
            proc.join()

    def __enter__(self) -> MathChecker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
