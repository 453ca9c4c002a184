"""Session-wide fixtures: expensive things are built once per test session and shared.

- `tiny_models`: the four tiny source-family models (llama3, qwen2, gemma2, mistral), built offline.
- `tiny_armorm`: a tiny reward model in ArmoRM's exact checkpoint layout.
- `prefect_server`: a real local Prefect server (SQLite, loopback) for flow and deployment tests.
- `ray_cluster`: a real local Ray cluster (a head on loopback, 2 CPUs, 2 GPU slots); yields its address.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# vLLM on CPU: the NUMA free-memory check needs an explicit KV cache size, and each engine start
# leaves ZMQ socket files in TMPDIR, so keep those inside a folder this session removes.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
_TMP = Path(os.environ.get("FUSECHAT_TEST_TMP", "/tmp")) / f"fusechat-tests-{os.getpid()}"
_TMP.mkdir(parents=True, exist_ok=True)
os.environ["TMPDIR"] = str(_TMP)


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_TMP, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    from fusechat.testing.tiny import FAMILIES, build_tiny_lm

    root = tmp_path_factory.mktemp("tiny-models")
    return {family: build_tiny_lm(family, root / family) for family in FAMILIES}


@pytest.fixture(scope="session")
def tiny_armorm(tmp_path_factory) -> Path:
    from fusechat.testing.tiny_armorm import build_tiny_armorm

    return build_tiny_armorm(tmp_path_factory.mktemp("tiny-armorm") / "armorm")


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """A real Prefect server on loopback; yields the environment a client process needs."""
    from servers import free_port, running

    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    env = dict(os.environ)
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_MEMO_STORE_PATH=str(home / "memo_store.toml"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
        PREFECT_CLI_PROMPT="false",
        PREFECT_RUNNER_POLL_FREQUENCY="2",
        PREFECT_API_URL=f"http://127.0.0.1:{port}/api",
    )
    # a foreground process, not `--background` (that stopped answering mid-run before)
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    with running(cmd, f"http://127.0.0.1:{port}/api/health", home / "server.log", env=env, timeout_s=120):
        yield env


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """A Ray head on loopback with 2 CPUs and 2 logical GPUs (`fusechat.testing.ray_head`)."""
    from fusechat.testing.ray_head import local_ray_head

    with local_ray_head(tmp_path_factory.mktemp("ray"), slots=2) as address:
        try:
            yield address
        finally:
            try:
                import ray

                ray.shutdown()  # this process, if a test joined the cluster from here
            except ImportError:
                pass
