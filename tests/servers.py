"""Start a real server process for a test, wait until it answers, and stop it with its children."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Callable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@contextmanager
def running(cmd: list[str], ready: str | Callable[[], bool], log_path: Path, env: dict | None = None,
            timeout_s: float = 300):
    """Run `cmd` in its own process group until it is ready (`ready`: a health URL that answers 200,
    or a check that returns True); yield the process."""
    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    is_ready = (lambda: _answers(ready)) if isinstance(ready, str) else ready
    try:
        deadline = time.time() + timeout_s
        while not is_ready():
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"{cmd[:4]} did not start:\n{log_path.read_text(errors='replace')[-3000:]}")
            time.sleep(0.5)
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()
