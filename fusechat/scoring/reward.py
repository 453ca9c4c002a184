"""Reward scoring: ArmoRM or any `AutoModelForSequenceClassification`, one batching path.

Input: the reward model's own chat template applied once to the conversation (prompt turns plus
the assistant reply), no generation prompt, tokenized without adding special tokens again (exactly
one BOS). Batches are formed over length-sorted inputs under a token budget (`batch_tokens`
counts padded tokens), right-padded with an attention mask. dtype "auto": bfloat16 on CUDA,
float32 on CPU. Inputs longer than the model's context are truncated (the head of the
conversation plus the final end-of-turn token, where the reward is read) or skipped, per option.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

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
        batch_tokens: int = 16384,
        overlong: Literal["truncate", "skip"] = "truncate",
    ):
        import torch
        from transformers import AutoTokenizer

        if overlong not in OVERLONG:
            raise ValueError(f"overlong must be one of {OVERLONG}, got {overlong!r}")
        self.device = device or default_device()
        self.dtype = resolve_dtype(dtype, self.device)
        self.kind, self.batch_tokens, self.overlong = kind, batch_tokens, overlong
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

    def _forward(self, batch: list[tuple[list[int], int, bool]]):
        torch = self._torch
        width = max(len(ids) for ids, _, _ in batch)
        input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (ids, _, _) in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            mask[row, : len(ids)] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        if self.kind == "armorm":
            gpos = torch.tensor([g for _, g, _ in batch], device=self.device)
            score, objectives = self.model(input_ids, mask, gpos)
        else:
            logits = self._classify(input_ids, mask)
            score, objectives = logits[:, 0], (logits if logits.shape[1] > 1 else None)
        score = score.float().cpu().tolist()
        objectives = objectives.float().cpu().tolist() if objectives is not None else [None] * len(batch)
        return score, objectives

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
        ready: list[tuple[int, tuple[list[int], int, bool]]] = []
        for i, ids in enumerate(self.encode_many(conversations)):
            prepared = self._prepare(ids)
            if isinstance(prepared, str):
                out[i] = RewardOutput(None, None, False, prepared)
            else:
                ready.append((i, prepared))
        if progress and len(ready) < len(conversations):
            progress(len(conversations) - len(ready))
        from torch.nn.attention import SDPBackend, sdpa_kernel

        # Not cuDNN attention (PyTorch's first choice for bf16 on Hopper): it builds a plan for
        # every new (batch, length) shape, and scoring sees a new shape in almost every batch.
        backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
        with self._torch.inference_mode(), sdpa_kernel(backends):
            for batch in token_batches([len(p[0]) for _, p in ready], self.batch_tokens):
                scores, objectives = self._forward([ready[j][1] for j in batch])
                for j, s, o in zip(batch, scores, objectives):
                    i, (_, _, truncated) = ready[j]
                    out[i] = RewardOutput(s, o, truncated, "input truncated to max_length" if truncated else "")
                if progress:
                    progress(len(batch))
        return out  # type: ignore[return-value]
