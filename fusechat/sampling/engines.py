"""One interface, three engines: vLLM offline, an OpenAI-compatible server, transformers.

Every engine takes requests as token ids (rendered once by `fusechat.sampling.render`), samples all
`n` responses of a prompt in one request, and reports per sample the text, the finish reason and
the completion token count, plus the prompt ids the engine itself received (the one-BOS check reads
those, not what we meant to send).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from fusechat.engine_options import OpenAIOptions, TransformersOptions
from fusechat.recipe import Sampling

FINISH = ("stop", "length", "error")


@dataclass
class Request:
    key: str
    prompt_ids: list[int]
    n: int


@dataclass
class Sample:
    text: str
    finish_reason: str  # one of FINISH
    completion_tokens: int


@dataclass
class Result:
    key: str
    received_ids: list[int]
    samples: list[Sample] = field(default_factory=list)


def _finish(reason: str | None) -> str:
    return reason if reason in ("stop", "length") else "error"


class Engine:
    """Load once, then `generate` shard after shard; `seed` makes one shard's samples repeatable."""

    name = "base"
    max_model_len: int

    def generate(self, requests: list[Request], sampling: Sampling, seed: int) -> list[Result]:
        raise NotImplementedError

    def close(self) -> None:
        pass

GiB = 1 << 30


def cpu_kv_cache_bytes() -> int:
    """The KV cache of a vLLM engine on a CPU machine: a quarter of the memory now available on the
    NUMA node vLLM allocates from, at least 1 GiB.

    vLLM-CPU allocates the cache after loading the weights and fails if it does not fit in what is
    free then; a quarter leaves the rest of the node to the weights, the engine's own process and
    whatever else runs (a scoring stage, a second engine). 1 GiB holds ~8k tokens of context of an
    8B model in bf16, which is what the CPU path is for (tiny models, tests, the demo); a larger
    cache is one `kv_cache_memory_bytes` away.
    """
    from vllm.utils.cpu_resource_utils import get_allowed_cpu_list, get_memory_node_info

    cpus = get_allowed_cpu_list()
    node = cpus[0].numa_node if cpus else 0
    return max(GiB, get_memory_node_info(node).available_memory // 4)


def cpu_memory_default(options: dict[str, Any]) -> dict[str, Any]:
    """`{"kv_cache_memory_bytes": ...}` for a vLLM engine on a CPU machine whose memory nothing
    else sizes (the recipe's options or VLLM_CPU_KVCACHE_SPACE); `{}` on accelerators."""
    sized = {"kv_cache_memory_bytes", "gpu_memory_utilization"} & set(options)
    if sized or os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        return {}
    from vllm.platforms import current_platform

    return {"kv_cache_memory_bytes": cpu_kv_cache_bytes()} if current_platform.is_cpu() else {}


def _reseed(worker, seed: int) -> None:
    from vllm.utils.torch_utils import set_random_seed

    set_random_seed(seed)


class VllmEngine(Engine):
    """vLLM's offline `LLM`; `engine_options` go to its constructor unchanged (tensor_parallel_size,
    max_model_len, dtype, enforce_eager, gpu_memory_utilization, ...; `fusechat.engine_options`
    checks them against vLLM's own arguments when the recipe is loaded).

    On a CPU machine the KV cache gets a size of its own (`cpu_kv_cache_bytes`) unless the recipe
    sets `kv_cache_memory_bytes` or `gpu_memory_utilization`, or the environment sets
    `VLLM_CPU_KVCACHE_SPACE` (GiB). Without one of them vLLM-CPU reserves 92% of the NUMA node's
    memory and refuses to start whenever less than that is free.
    """

    name = "vllm"

    def __init__(self, model: str, revision: str | None, options: dict[str, Any], seed: int):
        # The per-shard reseed below ships a function to the engine's worker processes, which vLLM
        # only allows with pickle serialization; the processes are all this worker's own children.
        os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
        from vllm import LLM
        from vllm.platforms import current_platform

        if current_platform.is_cpu():
            # On CPU, vLLM's engine core and its worker are two more spawned processes that import
            # vLLM and torch again: 29 s of a 31 s start on two cores, against 3 s in this process
            # (measured), and generation is no slower. This worker process already holds one
            # engine and is what a crash takes down. On accelerators the separate engine core
            # overlaps scheduling with the device, so it stays.
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

        options = {**cpu_memory_default(options), **options}
        # The seed goes to LLM, never SamplingParams(seed=...): per-request seeds crash on CPU.
        self.llm = LLM(model=model, revision=revision, seed=seed, **options)
        self.max_model_len = int(self.llm.llm_engine.model_config.max_model_len)

    def generate(self, requests, sampling, seed):
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        # Unseeded requests draw from the worker's global generator; resetting it per shard makes a
        # shard's samples independent of which shards this engine computed before it (resume).
        # The prefix cache is reset too: what earlier shards left in it changes the batches (and so
        # which random numbers each sequence draws).
        self.llm.reset_prefix_cache()
        self.llm.collective_rpc(_reseed, args=(seed,))
        params = [
            SamplingParams(
                n=r.n,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=sampling.top_k,
                repetition_penalty=sampling.repetition_penalty,
                max_tokens=sampling.max_tokens,
            )
            for r in requests
        ]
        outs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=r.prompt_ids) for r in requests], params, use_tqdm=False
        )
        results = []
        for r, out in zip(requests, outs):
            samples = [
                Sample(o.text, _finish(o.finish_reason), len(o.token_ids))
                for o in sorted(out.outputs, key=lambda o: o.index)
            ]
            results.append(Result(r.key, list(out.prompt_token_ids), samples))
        return results


class OpenAIEngine(Engine):
    """Any OpenAI-compatible server (a vLLM server, a hosted endpoint).

    Options: `fusechat.engine_options.OpenAIOptions` (base_url, api_key_env, served_model,
    concurrency, max_model_len, timeout). Prompts go to /v1/completions as token ids, so the server applies no template of its own.
    """

    name = "openai"

    def __init__(self, model: str, tokenizer, options: dict[str, Any]):
        import openai

        opts = OpenAIOptions.model_validate(options)
        key = os.environ.get(opts.api_key_env, "EMPTY")
        self.client = openai.OpenAI(base_url=opts.base_url, api_key=key, timeout=opts.timeout, max_retries=3)
        self.model = opts.served_model or model
        self.tokenizer = tokenizer
        self.concurrency = opts.concurrency
        served = {m.id: m for m in self.client.models.list().data}
        if self.model not in served:
            raise ValueError(f"server {opts.base_url} does not serve {self.model!r}; it serves {sorted(served)}")
        reported = getattr(served[self.model], "max_model_len", None)
        self.max_model_len = int(opts.max_model_len or reported or tokenizer.model_max_length)

    def _one(self, r: Request, sampling: Sampling) -> Result:
        resp = self.client.completions.create(
            model=self.model,
            prompt=r.prompt_ids,
            n=r.n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            max_tokens=sampling.max_tokens,
            # vLLM extensions; other servers ignore unknown fields or reject them loudly
            extra_body={"top_k": sampling.top_k, "repetition_penalty": sampling.repetition_penalty,
                        "return_token_ids": True},
        )
        received = r.prompt_ids
        samples = []
        for c in sorted(resp.choices, key=lambda c: c.index):
            extra = c.model_extra or {}
            received = extra.get("prompt_token_ids") or received
            ids = extra.get("token_ids")
            n_tok = len(ids) if ids is not None else len(self.tokenizer.encode(c.text, add_special_tokens=False))
            samples.append(Sample(c.text, _finish(c.finish_reason), n_tok))
        return Result(r.key, list(received), samples)

    def generate(self, requests, sampling, seed):
        # The server owns its seed; a per-request seed would crash vLLM-CPU servers (ENV_NOTES).
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(lambda r: self._one(r, sampling), requests))


class TransformersEngine(Engine):
    """`model.generate` with the same sampling settings: the fallback where vLLM does not run.

    Options: `fusechat.engine_options.TransformersOptions` (dtype, device, batch_size, max_model_len).
    """

    name = "transformers"

    def __init__(self, model: str, revision: str | None, tokenizer, options: dict[str, Any]):
        import torch
        from transformers import AutoModelForCausalLM

        opts = TransformersOptions.model_validate(options)
        self.device = opts.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.batch_size = opts.batch_size
        self.model = AutoModelForCausalLM.from_pretrained(model, revision=revision, dtype=opts.dtype).to(self.device).eval()
        self.tokenizer = tokenizer
        cfg = self.model.config
        self.max_model_len = int(opts.max_model_len or getattr(cfg, "max_position_embeddings", 2048))
        eos = self.model.generation_config.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if tokenizer.eos_token_id is not None:
            self.eos.add(tokenizer.eos_token_id)
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos or {0})

    def generate(self, requests, sampling, seed):
        import torch

        torch.manual_seed(seed)
        results = []
        for start in range(0, len(requests), self.batch_size):
            batch = requests[start:start + self.batch_size]
            width = max(len(r.prompt_ids) for r in batch)
            # left padding: generation continues right after each prompt's last token
            ids = torch.tensor([[self.pad] * (width - len(r.prompt_ids)) + r.prompt_ids for r in batch])
            mask = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in batch])
            n = max(r.n for r in batch)
            greedy = sampling.temperature == 0
            with torch.no_grad():
                out = self.model.generate(
                    input_ids=ids.to(self.device),
                    attention_mask=mask.to(self.device),
                    do_sample=not greedy,
                    temperature=None if greedy else sampling.temperature,
                    top_p=None if greedy else sampling.top_p,
                    top_k=None if greedy or sampling.top_k < 0 else sampling.top_k,
                    repetition_penalty=sampling.repetition_penalty,
                    max_new_tokens=min(sampling.max_tokens, self.max_model_len - width),
                    num_return_sequences=n,
                    eos_token_id=sorted(self.eos) or None,
                    pad_token_id=self.pad,
                )
            new = out[:, width:].tolist()
            for i, r in enumerate(batch):
                samples = []
                for toks in new[i * n:i * n + r.n]:
                    stop = next((j for j, t in enumerate(toks) if t in self.eos), None)
                    kept = toks if stop is None else toks[:stop]
                    text = self.tokenizer.decode(kept, skip_special_tokens=True)
                    samples.append(Sample(text, "length" if stop is None else "stop", len(kept) + (stop is not None)))
                results.append(Result(r.key, [int(t) for t in ids[i][width - len(r.prompt_ids):]], samples))
        return results


def load_engine(engine: str, model: str, revision: str | None, tokenizer, options: dict[str, Any], seed: int) -> Engine:
    if engine == "vllm":
        return VllmEngine(model, revision, options, seed)
    if engine == "openai":
        return OpenAIEngine(model, tokenizer, options)
    if engine == "transformers":
        return TransformersEngine(model, revision, tokenizer, options)
    raise ValueError(f"unknown engine {engine!r}")
