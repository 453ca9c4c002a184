"""Reward scoring: ArmoRM or any `AutoModelForSequenceClassification`, one batching path.

Input: the reward model's own chat template applied once to the conversation (prompt turns plus
the assistant reply), no generation prompt, tokenized without adding special tokens again (exactly
one BOS). Batches are formed over length-sorted inputs under a token budget (`batch_tokens`
counts padded tokens), right-padded with an attention mask. ArmoRM replies that follow the same
prompt tokens (the samples of one prompt, 20-32 per prompt in the recipe) share one pass over the
prompt: its key/value cache is computed once and each reply continues from it, which gives the
scores of one pass per conversation with the prompt's arithmetic done once. Identical token
sequences run once. dtype "auto": bfloat16 on CUDA, float32 on CPU. Inputs longer than the model's
context are truncated (the head of the conversation plus the final end-of-turn token, where the
reward is read) or skipped, per option.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from fusechat.recipe import Recipe

OVERLONG = ("truncate", "skip")


@dataclass
class RewardOutput:
    score: float | None  # None: not scored, see detail
    objectives: list[float] | None
    truncated: bool = False
    detail: str = ""


def resolve_dtype(name: str, device: str):
    import torch

    if name == "auto":
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def token_batches(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Indices grouped so that rows x longest row <= batch_tokens (a longer row goes alone).

    Longest first: a batch that does not fit in memory fails at the start, not after an hour.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= batch_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


class RewardScorer:
    def __init__(
        self,
        model_path: str,
        kind: Literal["armorm", "sequence_classification"] = "armorm",
        dtype: str = "auto",
        device: str | None = None,
        max_length: int = 4096,
        batch_tokens: int | None = None,
        overlong: Literal["truncate", "skip"] = "truncate",
        share_prompts: bool = True,
    ):
        import torch
        from transformers import AutoTokenizer

        if overlong not in OVERLONG:
            raise ValueError(f"overlong must be one of {OVERLONG}, got {overlong!r}")
        self.device = device or default_device()
        self.dtype = resolve_dtype(dtype, self.device)
        self.kind, self.overlong = kind, overlong
        # On CPU, batches beyond a few thousand tokens run slower per token: their activations
        # (tokens x intermediate size) no longer fit in the caches. GPUs want large batches.
        self.batch_tokens = batch_tokens or (2048 if self.device == "cpu" else 16384)
        self.share_prompts = share_prompts and kind == "armorm"
        self.tokenizer = tok = AutoTokenizer.from_pretrained(model_path)
        if kind == "armorm":
            from fusechat.scoring.armorm import gating_pattern_ids, load_armorm

            self.model = load_armorm(model_path, dtype=self.dtype, device=self.device)
            self.pattern = gating_pattern_ids(tok)
        elif kind == "sequence_classification":
            from transformers import AutoModelForSequenceClassification

            self.model = AutoModelForSequenceClassification.from_pretrained(model_path, dtype=self.dtype)
            self.model = self.model.to(self.device).eval()
            self.pattern = None
        else:
            raise ValueError(f"unknown reward model kind {kind!r}")
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        if self.pad_id is None:
            raise ValueError(f"{model_path}: tokenizer has neither a pad nor an eos token to pad batches with")
        context = getattr(self.model.config, "max_position_embeddings", None) or max_length
        self.max_length = min(max_length, context)
        # templates of some models (Qwen) carry no BOS while their tokenizer adds none either;
        # others add it in the tokenizer only: one BOS either way
        self._bos = tok.bos_token_id if tok("x")["input_ids"][:1] == [tok.bos_token_id] else None
        self._torch = torch

    def encode_many(self, conversations: list[list[dict]]) -> list[list[int]]:
        render = self.tokenizer.apply_chat_template
        texts = [render(m, tokenize=False, add_generation_prompt=False) for m in conversations]
        # one call: the Rust tokenizer encodes a list in parallel
        encoded = self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        if self._bos is not None:
            encoded = [ids if ids[:1] == [self._bos] else [self._bos] + ids for ids in encoded]
        return encoded

    def encode(self, messages: list[dict]) -> list[int]:
        return self.encode_many([messages])[0]

    def _prepare(self, ids: list[int]) -> tuple[list[int], int, bool] | str:
        """(ids, gating position, truncated), or why the conversation cannot be scored."""
        from fusechat.scoring.armorm import find_gating_position

        gpos = -1
        if self.pattern is not None:
            try:
                gpos = find_gating_position(ids, self.pattern)
            except ValueError as e:
                return f"no gating position: {e}"
        if len(ids) <= self.max_length:
            return ids, gpos, False
        if self.overlong == "skip":
            return f"overlong: input has {len(ids)} tokens > max_length {self.max_length}; not scored"
        if gpos + len(self.pattern or []) > self.max_length - 1:
            return f"overlong prompt: the prompt alone exceeds max_length {self.max_length} ({len(ids)} tokens)"
        return ids[: self.max_length - 1] + ids[-1:], gpos, True

    def _pad(self, seqs: list[list[int]]):
        """Right-padded ids and their attention mask, on the model's device."""
        torch = self._torch
        input_ids = torch.full((len(seqs), max(map(len, seqs))), self.pad_id, dtype=torch.long)
        mask = torch.zeros(input_ids.shape, dtype=torch.long)
        for row, ids in enumerate(seqs):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            mask[row, : len(ids)] = 1
        return input_ids.to(self.device), mask.to(self.device)

    def _forward(self, batch: list[tuple[list[int], int, bool]]):
        input_ids, mask = self._pad([ids for ids, _, _ in batch])
        if self.kind == "armorm":
            gpos = self._torch.tensor([g for _, g, _ in batch], device=self.device)
            score, objectives = self.model(input_ids, mask, gpos)
        else:
            logits = self._classify(input_ids, mask)
            score, objectives = logits[:, 0], (logits if logits.shape[1] > 1 else None)
        score = score.float().cpu().tolist()
        objectives = objectives.float().cpu().tolist() if objectives is not None else [None] * len(batch)
        return score, objectives

    def _shared(self, groups: list[tuple[list[int], int, list[tuple[int, list[int]]]]]):
        """(keys, scores, objectives) per batch of replies; a group = (prompt ids, gating position,
        [(key, reply ids)]). Prompts are batched under the token budget, then their replies, each
        reply batch counting its prompts' padded width too (their cache is part of its attention)."""
        torch, model = self._torch, self.model
        for prompt_batch in token_batches([len(g[0]) for g in groups], self.batch_tokens):
            chosen = [groups[k] for k in prompt_batch]
            ids, mask = self._pad([prompt for prompt, _, _ in chosen])
            hidden, cache = model.encode_prompts(ids, mask)
            at = torch.tensor([g for _, g, _ in chosen], device=self.device)
            gating_hidden = hidden[torch.arange(len(chosen), device=self.device), at]
            del hidden
            replies = [(row, key, reply) for row, (_, _, members) in enumerate(chosen) for key, reply in members]
            for batch in token_batches([ids.shape[1] + len(r) for _, _, r in replies], self.batch_tokens):
                rows = torch.tensor([replies[b][0] for b in batch], device=self.device)
                reply_ids, reply_mask = self._pad([replies[b][2] for b in batch])
                h = model.continue_prompts(cache, mask, rows, reply_ids, reply_mask)
                last = h[torch.arange(len(batch), device=self.device), reply_mask.sum(dim=-1) - 1]
                score, objectives = model.heads(last, gating_hidden[rows])
                yield [replies[b][1] for b in batch], score.float().cpu().tolist(), objectives.float().cpu().tolist()

    def _batches(self, ready: list[tuple[list[int], int, bool]]):
        """(indices into ready, scores, objectives) per forward pass."""
        plain, groups = list(range(len(ready))), []
        if self.share_prompts:
            by_prompt: dict[tuple[int, ...], list[int]] = defaultdict(list)
            for j, (ids, gpos, _) in enumerate(ready):
                # the prompt ends with the gating pattern; the reply keeps at least the token the
                # reward is read at
                by_prompt[tuple(ids[: min(gpos + len(self.pattern), len(ids) - 1)])].append(j)
            plain = [js[0] for js in by_prompt.values() if len(js) == 1]
            groups = [(list(prompt), ready[js[0]][1], [(j, ready[j][0][len(prompt):]) for j in js])
                      for prompt, js in by_prompt.items() if len(js) > 1]
        yield from self._shared(groups)
        for batch in token_batches([len(ready[j][0]) for j in plain], self.batch_tokens):
            js = [plain[b] for b in batch]
            yield js, *self._forward([ready[j] for j in js])

    def _classify(self, input_ids, mask):
        m = self.model
        if hasattr(m, "score") and m.base_model is not m:
            # Decoder classifiers (Llama, Qwen2, Mistral, Gemma2): transformers finds each row's last
            # token through the pad id, which misreads rows when the pad id is also the <eos> that
            # ends every reply; the attention mask says where each row ends.
            hidden = m.base_model(input_ids=input_ids, attention_mask=mask).last_hidden_state
            rows = self._torch.arange(input_ids.shape[0], device=input_ids.device)
            return m.score(hidden[rows, mask.sum(dim=-1) - 1])
        return m(input_ids=input_ids, attention_mask=mask).logits  # encoders pool their first token

    def score(self, conversations: list[list[dict]], progress=None) -> list[RewardOutput]:
        """Conversations (prompt turns + assistant reply) -> outputs in order; progress(n) per batch."""
        out: list[RewardOutput | None] = [None] * len(conversations)
        # Identical token sequences get one pass: a source that repeats an answer (short math
        # answers, a greedy-like sampler) or two sources that agree need not cost a pass each.
        ready: list[tuple[list[int], int, bool]] = []
        copies: list[list[int]] = []  # ready index -> indices of the conversations with its tokens
        seen: dict[tuple[int, ...], int] = {}
        for i, ids in enumerate(self.encode_many(conversations)):
            prepared = self._prepare(ids)
            if isinstance(prepared, str):
                out[i] = RewardOutput(None, None, False, prepared)
                continue
            j = seen.setdefault(tuple(prepared[0]), len(ready))
            if j == len(ready):
                ready.append(prepared)
                copies.append([])
            copies[j].append(i)
        unscored = len(conversations) - sum(map(len, copies))
        if progress and unscored:
            progress(unscored)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        # Not cuDNN attention (PyTorch's first choice for bf16 on Hopper): it builds a plan for
        # every new (batch, length) shape, and scoring sees a new shape in almost every batch.
        backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
        with self._torch.inference_mode(), sdpa_kernel(backends):
            for batch, scores, objectives in self._batches(ready):
                for j, s, o in zip(batch, scores, objectives):
                    truncated = ready[j][2]
                    for i in copies[j]:
                        out[i] = RewardOutput(s, list(o) if o is not None else None, truncated,
                                              "input truncated to max_length" if truncated else "")
                if progress:
                    progress(sum(len(copies[j]) for j in batch))
        return out  # type: ignore[return-value]


# -- from the recipe: what the score and eval stages both use -------------------------------------
def resolve_model(recipe: Recipe) -> tuple[str, str]:
    """(local folder, revision) of the recipe's reward model; a local folder's revision is a content hash."""
    from pathlib import Path

    from fusechat.run import stable_hash

    rm = recipe.scoring.reward_model
    ref = recipe.resolve(rm.model)
    if Path(ref).is_dir():
        files = sorted((f.name, f.stat().st_size) for f in Path(ref).iterdir() if f.suffix == ".safetensors")
        config = (Path(ref) / "config.json").read_text() if (Path(ref) / "config.json").exists() else ""
        return ref, rm.revision or f"local-{stable_hash(config, files)}"
    from huggingface_hub import snapshot_download

    local = snapshot_download(ref, revision=rm.revision, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"])
    return local, Path(local).name  # the snapshot folder is named by its commit


def recipe_scorer(recipe: Recipe, model_path: str, device: str | None = None) -> RewardScorer:
    """A `RewardScorer` of the model at `model_path` (from `resolve_model`) with the recipe's settings."""
    rm = recipe.scoring.reward_model
    return RewardScorer(model_path, kind=rm.kind, dtype=rm.dtype, device=device, max_length=rm.max_length,
                        batch_tokens=rm.batch_tokens, overlong=rm.overlong)
