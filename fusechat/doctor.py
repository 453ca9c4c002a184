"""`fusechat doctor RECIPE`: check a recipe's models before any GPU hour is spent.

Seconds, no weights: every source, the target and the reward model are checked from their
tokenizers and configs alone (local folders, the hub cache, or the hub), each check with a verdict
and, when it is not fine, a fix:

- the chat template renders, with exactly one BOS, and the stop ids the engine will use end a turn;
- which tokens an SFT row trains (on a sample conversation, with the template training uses);
- ArmoRM's gating pattern is found in the reward model's inputs;
- prompt lengths plus `max_tokens` fit `max_model_len`;
- unpinned hub revisions (a warning: the run cannot say which weights made it);
- `engine_options` (their names and types were checked when the recipe loaded);
- memory: each source's weights plus one full-length sequence's KV cache against the visible
  accelerators and `tensor_parallel_size`; the target's training memory (full, LoRA, QLoRA; sharded
  by ZeRO-3/FSDP over the devices) after accelerate's estimator (`accelerate estimate-memory`).

A check that cannot run (a model neither local, cached nor reachable) says which model and why, and
the others go on. Verdicts: ok, warn, fail (a blocker: the command exits 1), skip (could not run).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cache
from typing import Any

from fusechat.recipe import Recipe, is_local_path
from fusechat.templates import (
    TemplateError, identify, template_kwargs, template_messages, template_text, training_template,
)

SAMPLE = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "2 + 3 = 5."},
]
GIB = 1024**3
PROMPTS_SAMPLED = 2000  # prompts whose lengths are measured per source (the longest decide)


@dataclass
class Check:
    model: str
    check: str
    verdict: str  # ok | warn | fail | skip
    detail: str
    fix: str = ""


class _Models:
    """Tokenizers and configs, loaded once each; a model that cannot be had is remembered with why."""

    def __init__(self) -> None:
        self.cache: dict[tuple[str, str | None, str], Any] = {}

    def _load(self, kind: str, ref: str, revision: str | None):
        key = (ref, revision, kind)
        if key not in self.cache:
            from transformers import AutoConfig, AutoTokenizer, GenerationConfig

            cls = {"tokenizer": AutoTokenizer, "config": AutoConfig, "generation": GenerationConfig}[kind]
            try:
                # the hub cache first, so a cached model costs no network round trip
                self.cache[key] = cls.from_pretrained(ref, revision=revision, local_files_only=True)
            except Exception as local_error:  # noqa: BLE001 - any failure is reported, not raised
                if is_local_path(ref) or not _hub_reachable():
                    self.cache[key] = _Missing(ref, local_error if is_local_path(ref) else OSError(
                        "not in the hub cache, and the hub is not reachable from here (offline)"))
                else:
                    try:
                        self.cache[key] = cls.from_pretrained(ref, revision=revision)
                    except Exception as e:  # noqa: BLE001
                        self.cache[key] = _Missing(ref, e)
        return self.cache[key]

    def tokenizer(self, ref, revision):
        return self._load("tokenizer", ref, revision)

    def config(self, ref, revision):
        return self._load("config", ref, revision)

    def generation(self, ref, revision):
        return self._load("generation", ref, revision)


@cache
def _hub_reachable() -> bool:
    """One quick look (3 s at most) instead of a library's retries per file and model: on a machine
    without network those take minutes for a recipe's seven models."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=3).close()
        return True
    except OSError:
        return False


@dataclass
class _Missing:
    ref: str
    error: Exception

    def why(self) -> str:
        first = str(self.error).strip().splitlines()[0] if str(self.error).strip() else type(self.error).__name__
        where = "the local folder" if is_local_path(self.ref) else "the hub cache or the hub"
        return f"cannot load {self.ref} from {where}: {first[:160]}"


def _count(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"


def _size(b: float) -> str:
    return f"{b / GIB:.1f} GiB" if b >= GIB else f"{b / 2**20:.1f} MiB"


def _ok(x) -> bool:
    return not isinstance(x, _Missing)


# -- the checks ----------------------------------------------------------------------------------
def _template_checks(label: str, tok, family: str, date: str) -> list[Check]:
    out = []
    known = identify(template_text(tok))
    name = f"{known.name} ({known.models})" if known else "not one of the known templates"
    try:
        from fusechat.sampling.render import render_ids

        ids = render_ids(tok, SAMPLE[:-1], family, template_kwargs(date))
    except Exception as e:  # noqa: BLE001 - a template that raises is the finding
        return [Check(label, "chat template", "fail", f"does not render a system + user chat: {e}",
                      f"check the template, or the recipe's family ({family})")]
    out.append(Check(label, "chat template", "ok", f"renders; {name}; prompt of the sample chat {len(ids)} tokens"))
    bos = tok.bos_token_id
    first = tok.encode("x", add_special_tokens=True)[:1] == [bos] if bos is not None else False
    if bos is not None and (first or ids[:1] == [bos]):
        n = ids.count(bos)
        out.append(Check(label, "one BOS", "ok" if n == 1 and ids[0] == bos else "fail",
                         f"{n} BOS ({tok.bos_token!r}) in the rendered prompt",
                         "" if n == 1 else "the template and the tokenizer both add one; fusechat renders straight "
                         "to ids, so this means the template itself writes two"))
    else:
        out.append(Check(label, "one BOS", "ok", "the family uses no BOS, and none is written"))
    return out


def _stop_check(label: str, tok, gen, known) -> Check:
    ids = set()
    eos = getattr(gen, "eos_token_id", None) if _ok(gen) else None
    ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tok.eos_token_id is not None:
        ids.add(tok.eos_token_id)
    names = ", ".join(sorted(repr(tok.convert_ids_to_tokens(i)) for i in ids)) or "none"
    if known is None:
        return Check(label, "stop ids", "ok" if ids else "warn", f"the engine stops on {names}",
                     "" if ids else "set eos_token_id in generation_config.json")
    eot = tok.convert_tokens_to_ids(known.end_of_turn)
    if eot in ids:
        return Check(label, "stop ids", "ok", f"the engine stops on {names}; {known.end_of_turn!r} ends a turn")
    return Check(label, "stop ids", "fail", f"the engine stops on {names}, not on {known.end_of_turn!r}, which ends "
                 "a turn: responses would run on to max_tokens",
                 f"add {eot} ({known.end_of_turn}) to eos_token_id in the model's generation_config.json")


def _revision_check(label: str, ref: str, revision: str | None, field: str) -> Check:
    if is_local_path(ref):
        return Check(label, "revision", "ok", "a local folder (recorded by content in the manifests)")
    if revision:
        return Check(label, "revision", "ok", f"pinned to {revision}")
    return Check(label, "revision", "warn", "unpinned: the hub's newest revision is used, and may change",
                 f"set {field}.revision to a commit hash")


def _params(config) -> tuple[int, int]:
    """(parameters, bytes of KV cache per token at 2 bytes a value), from the config alone: the
    model is built on the meta device, which allocates nothing."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    n = sum(p.numel() for p in model.parameters())
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = getattr(text, "num_attention_heads", 1)
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv = 2 * text.num_hidden_layers * kv_heads * head_dim * 2
    return n, kv


def _devices() -> tuple[list[int], str]:
    """Bytes of memory of each visible accelerator, and what they are (a CPU machine: its RAM)."""
    try:
        import torch

        if torch.cuda.is_available():
            sizes = [torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count())]
            return sizes, f"{len(sizes)} x {torch.cuda.get_device_name(0)}"
    except Exception:  # noqa: BLE001
        pass
    return [], "no accelerator"


def _ram() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _source_memory(label: str, source, config, devices: list[int], what: str) -> list[Check]:
    opts = source.engine_options
    if source.engine == "openai":
        return [Check(label, "memory", "ok", "served by its own server (engine openai)")]
    tp = int(opts.get("tensor_parallel_size", 1))
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    out = []
    heads = getattr(text, "num_attention_heads", None)
    if heads and heads % tp:
        out.append(Check(label, "tensor parallel", "fail", f"{heads} attention heads do not split over "
                         f"tensor_parallel_size {tp}", "choose a tensor_parallel_size that divides the head count"))
    try:
        n, kv_token = _params(config)
    except Exception as e:  # noqa: BLE001
        return out + [Check(label, "memory", "skip", f"cannot size the model from its config: {e}")]
    width = 4 if str(opts.get("dtype", "")).endswith("32") else 2
    max_len = int(opts.get("max_model_len") or getattr(text, "max_position_embeddings", 0) or 4096)
    need = n * width + kv_token * max_len
    per_device = need / tp
    detail = (f"{_count(n)} parameters: {_size(n * width)} of weights + {_size(kv_token * max_len)} KV cache for one "
              f"{max_len}-token sequence = {_size(per_device)} on each of {tp} device(s)")
    if devices:
        util = float(opts.get("gpu_memory_utilization", 0.9))
        if tp > len(devices):
            out.append(Check(label, "memory", "fail", f"{detail}; tensor_parallel_size {tp} but {what} visible",
                             "run on a node with enough GPUs, or lower tensor_parallel_size"))
        elif per_device > min(devices) * util:
            out.append(Check(label, "memory", "fail", f"{detail}; {what} hold {min(devices) * util / GIB:.1f} GiB each "
                             f"at gpu_memory_utilization {util}", "raise tensor_parallel_size or lower max_model_len"))
        else:
            out.append(Check(label, "memory", "ok", f"{detail}; fits {what}"))
        return out
    ram = _ram()
    if need <= ram:
        out.append(Check(label, "memory", "ok", f"{detail}; this machine has no accelerator: vLLM's CPU backend, "
                         f"{ram / GIB:.0f} GiB of RAM available"))
    else:
        out.append(Check(label, "memory", "warn", f"{detail}; no accelerator is visible here to check against",
                         f"run doctor on a GPU node to check the fit ({_size(per_device)} per GPU needed)"))
    return out


def _training_memory(cfg, config, devices: list[int], what: str, section: str) -> Check:
    from accelerate.commands.estimate import estimate_training_usage

    try:
        n, _ = _params(config)
    except Exception as e:  # noqa: BLE001
        return Check("target", "training memory", "skip", f"cannot size the model from its config: {e}")
    world = max(1, len(devices))
    if cfg.lora is None:
        # accelerate's estimate for Adam in mixed precision, batch size 1, activations aside
        sizes = estimate_training_usage(n * 4, "bfloat16" if devices else "float32")
        need, mode = max(sizes.values()) + sizes["model"], "full fine-tuning"
        sharded = need / world
        mode += f", sharded over {world} device(s) by ZeRO-3/FSDP" if world > 1 else ""
    else:
        weights = n * (0.5 if cfg.lora.load_in_4bit else 2)
        need = sharded = weights * 1.2  # the adapters and their optimizer states are ~1-2% of the model
        mode = "QLoRA (4-bit base)" if cfg.lora.load_in_4bit else "LoRA (bf16 base)"
    detail = f"{section}: {mode}, {_count(n)} parameters, about {_size(sharded)} per device before activations"
    if devices:
        ok = sharded <= min(devices)
        return Check("target", "training memory", "ok" if ok else "fail", f"{detail}; {what}",
                     "" if ok else "use more GPUs with --config zero3/fsdp, or LoRA/QLoRA (sft.lora)")
    ram = _ram()
    if need <= ram:
        return Check("target", "training memory", "ok", f"{detail}; CPU training, {ram / GIB:.0f} GiB RAM available")
    return Check("target", "training memory", "warn", f"{detail}; no accelerator is visible here to check against",
                 "run doctor on the training node")


def _length_check(label: str, recipe: Recipe, source, tok, config) -> Check:
    import pyarrow.parquet as pq

    text = config.get_text_config() if _ok(config) and hasattr(config, "get_text_config") else config
    max_len = source.engine_options.get("max_model_len") or (
        getattr(text, "max_position_embeddings", None) if _ok(config) else None)
    if not max_len:
        return Check(label, "lengths", "skip", "max_model_len unknown (no engine_options.max_model_len, no config)")
    max_tokens = source.sampling.max_tokens
    if max_tokens >= max_len:
        return Check(label, "lengths", "fail", f"max_tokens {max_tokens} >= max_model_len {max_len}",
                     f"lower sources[].sampling.max_tokens below {max_len}")
    path = recipe.run_path() / "prompts" / "prompts.parquet"
    domains = {d for d, n in source.responses.items() if n > 0}
    if not path.exists():
        return Check(label, "lengths", "ok", f"max_tokens {max_tokens} < max_model_len {max_len}; prompt lengths "
                     "not checked (no prompts yet)", "run `fusechat sample` (it builds the prompts first) and doctor again")
    table = pq.read_table(path, columns=["domain", "messages"])
    rows = [r for r in table.to_pylist() if r["domain"] in domains][:PROMPTS_SAMPLED]
    from fusechat.sampling.render import is_empty, render_ids

    variables = template_kwargs(recipe.template_date)
    lengths = [len(render_ids(tok, r["messages"], source.family, variables)) for r in rows if not is_empty(r["messages"])]
    if not lengths:
        return Check(label, "lengths", "ok", f"no prompts for this source's domains; max_tokens {max_tokens}")
    cut = sum(1 for n in lengths if n + max_tokens > max_len)
    longest = max(lengths)
    detail = (f"longest prompt {longest} tokens (of {len(lengths)} measured) + max_tokens {max_tokens} vs "
              f"max_model_len {max_len}")
    if longest >= max_len:
        return Check(label, "lengths", "warn", f"{detail}; {sum(n >= max_len for n in lengths)} prompt(s) leave no "
                     "room and are dropped as prompt_too_long", "raise max_model_len or lower filters.max_prompt_chars")
    if cut:
        return Check(label, "lengths", "warn", f"{detail}; {cut} response(s) can be cut before max_tokens",
                     "raise engine_options.max_model_len")
    return Check(label, "lengths", "ok", detail)


def _trained_tokens(tok, ref: str, recipe: Recipe) -> list[Check]:
    if not recipe.sft.assistant_only_loss:
        return [Check("target", "trained tokens", "ok", "sft.assistant_only_loss: false, every token is trained")]
    try:
        t = training_template(tok, ref, recipe.target.family)
    except TemplateError as e:
        return [Check("target", "trained tokens", "fail", str(e).split(". Tried")[0],
                      "put {% generation %} markers in the template, or sft.assistant_only_loss: false")]
    try:
        out = tok.apply_chat_template(template_messages(SAMPLE, recipe.target.family), chat_template=t.text,
                                      tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
                                      **template_kwargs(recipe.template_date))
    except Exception as e:  # noqa: BLE001 - TRL's patched templates raise on what they reject
        return [Check("target", "trained tokens", "fail", f"the training template ({t.source}) does not render: {e}")]
    trained = [i for i, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    text = tok.decode(trained)
    ok = bool(trained) and SAMPLE[-1]["content"] in text
    return [Check("target", "trained tokens", "ok" if ok else "fail",
                  f"with {t.source}, the sample chat trains {text!r} ({len(trained)} of {len(out['input_ids'])} tokens)",
                  "" if ok else "the training template marks no assistant words; check its {% generation %} markers")]


def _gating_check(tok) -> Check:
    from fusechat.scoring.armorm import GATING_PATTERN, find_gating_position, gating_pattern_ids

    try:
        text = tok.apply_chat_template(SAMPLE[1:], tokenize=False)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        pos = find_gating_position(ids, gating_pattern_ids(tok))
    except Exception as e:  # noqa: BLE001
        return Check("reward model", "gating pattern", "fail", f"{str(e)[:200]}",
                     "an armorm-kind reward model needs Llama-3's chat template")
    return Check("reward model", "gating pattern", "ok", f"{GATING_PATTERN!r} found at token {pos} of the sample chat")


def run_doctor(recipe: Recipe) -> list[Check]:
    from fusechat.sampling.worker import tokenizer_path

    models = _Models()
    checks: list[Check] = []
    devices, what = _devices()
    for i, s in enumerate(recipe.sources):
        label = f"source {s.name}"
        ref = tokenizer_path(recipe, s)
        checks.append(_revision_check(label, s.model, s.revision, f"sources[{i}]"))
        checks.append(Check(label, "engine options", "ok",
                            f"{s.engine}: {', '.join(sorted(s.engine_options)) or 'defaults'} (checked as the recipe loaded)"))
        tok = models.tokenizer(ref, s.revision)
        if not _ok(tok):
            checks.append(Check(label, "tokenizer", "skip", tok.why(), "download it, or run where the hub is reachable"))
            continue
        checks += _template_checks(label, tok, s.family, recipe.template_date)
        model_ref = recipe.resolve(s.model)
        gen = models.generation(model_ref, s.revision) if s.engine != "openai" else None
        checks.append(_stop_check(label, tok, gen, identify(template_text(tok))))
        config = models.config(model_ref, s.revision) if s.engine != "openai" else None
        checks.append(_length_check(label, recipe, s, tok, config) if config is None or _ok(config) else
                      Check(label, "lengths", "skip", config.why()))
        if config is not None and _ok(config):
            checks += _source_memory(label, s, config, devices, what)
        elif config is not None:
            checks.append(Check(label, "memory", "skip", config.why()))

    if recipe.target is not None:
        ref = recipe.resolve(recipe.target.model)
        checks.append(_revision_check("target", recipe.target.model, recipe.target.revision, "target"))
        tok = models.tokenizer(ref, recipe.target.revision)
        if _ok(tok):
            checks += _template_checks("target", tok, recipe.target.family, recipe.template_date)
            if recipe.sft is not None:
                checks += _trained_tokens(tok, ref, recipe)
        else:
            checks.append(Check("target", "tokenizer", "skip", tok.why()))
        config = models.config(ref, recipe.target.revision)
        if _ok(config) and recipe.sft is not None:
            checks.append(_training_memory(recipe.sft, config, devices, what, "sft"))
        elif not _ok(config):
            checks.append(Check("target", "training memory", "skip", config.why()))

    rm = recipe.scoring.reward_model
    ref = recipe.resolve(rm.model)
    checks.append(_revision_check("reward model", rm.model, rm.revision, "scoring.reward_model"))
    tok = models.tokenizer(ref, rm.revision)
    if not _ok(tok):
        checks.append(Check("reward model", "tokenizer", "skip", tok.why()))
    else:
        checks += [c for c in _template_checks("reward model", tok, "llama3", recipe.template_date)]
        if rm.kind == "armorm":
            checks.append(_gating_check(tok))
    return checks


def print_report(recipe: Recipe, checks: list[Check]) -> int:
    """The table on stderr; returns the number of blockers."""
    from rich.console import Console
    from rich.table import Table

    colour = {"ok": "green", "warn": "yellow", "fail": "bold red", "skip": "dim"}
    table = Table(title=f"fusechat doctor: {recipe.name}", show_lines=False)
    for col in ("model", "check", "verdict", "detail", "fix"):
        table.add_column(col, overflow="fold")
    for c in checks:
        table.add_row(c.model, c.check, f"[{colour[c.verdict]}]{c.verdict}[/]", c.detail, c.fix)
    console = Console(stderr=True, width=max(160, Console(stderr=True).width))
    console.print(table)
    counts = {v: sum(c.verdict == v for c in checks) for v in colour}
    console.print(f"{counts['ok']} ok, {counts['warn']} warning(s), {counts['fail']} blocker(s), "
                  f"{counts['skip']} could not run")
    return counts["fail"]


def doctor(recipe: Recipe) -> int:
    """Run every check and print the table; the number of blockers (0: go)."""
    return print_report(recipe, run_doctor(recipe))
