"""A real local Ray cluster: one head on loopback, for the Ray tests and the Ray bench."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def local_ray_head(folder: Path, slots: int, timeout_s: float = 60) -> Iterator[str]:
    """`ray start --head --block` on 127.0.0.1 with `slots` CPUs and `slots` logical GPUs (Ray
    places tasks by these numbers; on a CPU machine no device is touched); yields its address.

    Its log is `folder/head.log`, its session files `folder/tmp`. On exit its process group (the
    head, its raylet and the Ray workers) is killed: `ray stop` would stop every Ray on the machine.
    """
    folder.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    cmd = [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", "--node-ip-address",
           "127.0.0.1", "--port", str(port), "--num-cpus", str(slots), "--num-gpus", str(slots),
           "--include-dashboard=false", "--disable-usage-stats", "--temp-dir", str(folder / "tmp")]
    with open(folder / "head.log", "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.time() + timeout_s
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if proc.poll() is not None or time.time() > deadline:
                        tail = (folder / "head.log").read_text(errors="replace")[-3000:]
                        raise RuntimeError(f"ray head did not start (log {folder / 'head.log'}):\n{tail}") from None
                    time.sleep(0.3)
            yield f"127.0.0.1:{port}"
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
