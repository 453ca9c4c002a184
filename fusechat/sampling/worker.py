"""One source model in a process of its own: `python -m fusechat.sampling.worker JOB.json`.

An engine keeps its accelerator memory until its process exits, so every source gets a fresh
process and the next source starts on free memory. The job file names the recipe, the source and
the shards to compute; the worker writes each finished shard atomically and reports events (JSON
lines) on the file descriptor named by FUSECHAT_EVENTS_FD, keeping stdout and stderr free for the
engine's own logs. Exit codes: 0 done, 3 the model failed to load, 4 a shard failed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fusechat.recipe import Recipe
from fusechat.sampling.render import EMPTY, is_empty, render_ids
from fusechat.sampling.shards import (
    RECEIVED, load_prompts, model_revision, plan_source, response_id, settings, shard_path,
    write_shard,
)
from fusechat.templates import template_kwargs

TOO_LONG = "prompt_too_long"
LOAD_FAILED, SHARD_FAILED = 3, 4


class Events:
    def __init__(self) -> None:
        fd = os.environ.get("FUSECHAT_EVENTS_FD")
        self.out = os.fdopen(int(fd), "w", buffering=1) if fd else None

    def __call__(self, event: str, **data) -> None:
        if self.out is not None:
            try:
                self.out.write(json.dumps({"event": event, **data}) + "\n")
            except BrokenPipeError:  # the parent is gone: nobody will read these shards' news
                _kill_own_group()


def _kill_own_group() -> None:
    os.killpg(os.getpgid(0), signal.SIGKILL)


def _die_with_parent() -> int:
    """A worker whose parent was killed (kill -9 included) takes its engine processes down with it,
    so a rerun never races an orphan for the same shards or the same accelerator memory.

    The parent names itself (FUSECHAT_PARENT_PID): it may die while this process is still importing,
    and `getppid()` would then already name init. The watch is a shell loop, so it also runs while
    this interpreter is busy or finalizing. Linux (/proc) only, like vLLM-CPU itself.
    """
    parent, me = int(os.environ.get("FUSECHAT_PARENT_PID", os.getppid())), os.getpid()
    script = (f'while [ "$(cut -d" " -f4 /proc/{me}/stat 2>/dev/null)" = "{parent}" ]; do sleep 1; done; '
              f"kill -9 -{os.getpgid(0)}")
    subprocess.Popen(["/bin/sh", "-c", script], stdin=subprocess.DEVNULL)
    return parent


def tokenizer_path(recipe: Recipe, source) -> str:
    return recipe.resolve(source.engine_options.get("tokenizer", source.model))


def run(job: dict) -> int:
    emit = Events()
    recipe = Recipe.model_validate(job["recipe"])
    source = next(s for s in recipe.sources if s.name == job["source"])
    revision = model_revision(recipe, source)
    wanted = set(job["shards"])
    shards = [s for s in plan_source(recipe, source, load_prompts(recipe), revision) if s.shard_id in wanted]
    shards = [s for s in shards if not shard_path(recipe, s).exists()]
    if not shards:
        return 0
    model = recipe.resolve(source.model)
    try:
        from transformers import AutoTokenizer

        from fusechat.sampling.engines import load_engine

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path(recipe, source), revision=source.revision)
        options = {k: v for k, v in source.engine_options.items() if k != "tokenizer"}
        t0 = time.time()
        engine = load_engine(source.engine, model, source.revision, tokenizer, options, recipe.seed)
    except Exception as e:  # any failure to load is reported with the source and path, not retried
        emit("load_failed", message=f"{type(e).__name__}: {e}")
        return LOAD_FAILED
    emit("loaded", revision=revision, max_model_len=engine.max_model_len, seconds=time.time() - t0)

    prompts = load_prompts(recipe)
    messages = dict(zip(prompts.column("prompt_id").to_pylist(), prompts.column("messages").to_pylist()))
    setting = settings(source, revision)
    from fusechat.sampling.engines import Request

    variables = template_kwargs(recipe.template_date)
    for shard in shards:
        t0 = time.time()
        dropped: dict[str, list[str]] = {}
        requests = []
        for pid in shard.prompt_ids:
            msgs = messages[pid]
            if is_empty(msgs):
                dropped.setdefault(EMPTY, []).append(pid)
                continue
            ids = render_ids(tokenizer, msgs, source.family, variables)
            if len(ids) >= engine.max_model_len:  # no room left for even one response token
                dropped.setdefault(TOO_LONG, []).append(pid)
                continue
            requests.append(Request(pid, ids, shard.n))
        try:
            results = engine.generate(requests, source.sampling, shard.seed) if requests else []
        except Exception as e:
            emit("shard_failed", shard=shard.shard_id, message=f"{type(e).__name__}: {e}")
            return SHARD_FAILED
        rows = []
        for res in results:
            for i, s in enumerate(res.samples):
                rows.append({
                    "response_id": response_id(res.key, source.name, i, setting, recipe.seed),
                    "prompt_id": res.key, "source": source.name, "model_revision": revision,
                    "sample_index": i, "text": s.text, "finish_reason": s.finish_reason,
                    "prompt_tokens": len(res.received_ids), "completion_tokens": s.completion_tokens,
                    "truncated": s.finish_reason == "length",
                    RECEIVED: res.received_ids if i == 0 else None,
                })
        seconds = time.time() - t0
        meta = {
            "shard_id": shard.shard_id, "source": source.name, "domain": shard.domain, "n": shard.n,
            "requests": len(shard.prompt_ids), "prompt_ids": list(shard.prompt_ids), "dropped": dropped,
            "engine": source.engine, "max_model_len": engine.max_model_len, "host": socket.gethostname(),
            "pid": os.getpid(), "seconds": seconds, "finished_at": time.time(),
        }
        write_shard(recipe, shard, rows, meta)
        emit("shard", shard=shard.shard_id, prompts=len(shard.prompt_ids), responses=len(rows),
             completion_tokens=sum(r["completion_tokens"] for r in rows), seconds=seconds)
    engine.close()
    return 0


def main() -> None:
    parent = _die_with_parent()
    # vLLM leaves a file per engine start in TMPDIR (its torch.distributed rendezvous, even for one
    # process); a folder of this worker's own, removed when it ends, keeps /tmp clean.
    scratch = tempfile.mkdtemp(prefix="fusechat-worker-")
    os.environ["TMPDIR"] = tempfile.tempdir = scratch
    job = json.loads(Path(sys.argv[1]).read_text())
    try:
        code = run(job)
    except BaseException:
        # Interpreter shutdown would wait on the engine's exit hooks with this process's daemon
        # threads (the parent watch) frozen; report and leave at once instead.
        import traceback

        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    shutil.rmtree(scratch, ignore_errors=True)
    if os.getppid() != parent:
        _kill_own_group()
    # Engine shutdown hooks can hang or print tracebacks at interpreter exit; the work is on disk.
    os._exit(code)


if __name__ == "__main__":  # vLLM spawns its engine core, which re-imports the main module
    main()
