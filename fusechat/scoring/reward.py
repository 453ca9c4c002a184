"""Reward scoring: ArmoRM or any `AutoModelForSequenceClassification`.

Input: the reward model's own chat template applied once to the conversation (prompt turns plus
the assistant reply), no generation prompt, tokenized without adding special tokens again (exactly
one BOS). ArmoRM batches are packed, without padding: replies that follow the same prompt tokens
(the samples of one prompt, 20-32 per prompt in the recipe) form one tree, the prompt's tokens
once and then each reply's, and trees are packed under a token budget (`batch_tokens` counts the
tokens computed). Every layer but attention runs once per distinct token; attention runs over
each conversation's own sequence (`fusechat.scoring.armorm.packed_attention`), which gives the
scores of one pass per conversation with the prompt's arithmetic done once. Other models take
length-sorted, right-padded batches (`batch_tokens` counts padded tokens). Identical token
sequences run once. dtype "auto": bfloat16 on CUDA, float32 on CPU. Inputs longer than the
model's context are truncated (the head of the conversation plus the final end-of-turn token,
where the reward is read) or skipped, per option.
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


def pack_batches(sizes: list[int], batch_tokens: int) -> list[list[int]]:
    """Indices grouped so that each group's sizes sum to <= batch_tokens (a larger one goes alone):
    first fit, largest first, so a batch that does not fit in memory fails at the start."""
    order = sorted(range(len(sizes)), key=lambda i: -sizes[i])
    batches: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for b, free in enumerate(room):
            if sizes[i] <= free:
                batches[b].append(i)
                room[b] -= sizes[i]
                break
        else:
            batches.append([i])
            room.append(batch_tokens - sizes[i])
    return batches


def split_tree(prompt_len: int, reply_lens: list[int], batch_tokens: int) -> list[list[int]]:
    """Replies (indices) of one prompt in chunks of prompt + replies <= batch_tokens, each chunk
    computing the prompt again; one chunk whenever the whole tree fits."""
    chunks: list[list[int]] = []
    size = 0
    for i in sorted(range(len(reply_lens)), key=lambda i: -reply_lens[i]):
        if chunks and size + reply_lens[i] <= batch_tokens:
            chunks[-1].append(i)
            size += reply_lens[i]
        else:
            chunks.append([i])
            size = prompt_len + reply_lens[i]
    return chunks


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
        attention: str = "auto",
        model=None,
    ):
        """`attention` (ArmoRM): "sdpa", "varlen" (flash attention over the concatenated batch, CUDA)
        or "auto" (varlen where it works here). `model`: an ArmoRM already in memory, used instead
        of loading one; `model_path` then supplies the tokenizer only."""
        import torch
        from transformers import AutoTokenizer

        if overlong not in OVERLONG:
            raise ValueError(f"overlong must be one of {OVERLONG}, got {overlong!r}")
        self.device = device or default_device()
        self.dtype = resolve_dtype(dtype, self.device) if model is None else next(model.parameters()).dtype
        self.kind, self.overlong = kind, overlong
        # On CPU, batches beyond a few thousand tokens run slower per token: their activations
        # (tokens x intermediate size) no longer fit in the caches. On a GPU: room for a whole
        # recipe-shaped tree (20 replies of ~800 tokens after a shared prompt, ~16k tokens) twice,
        # so that a prompt is computed once; the matrix products are large enough well before.
        self.batch_tokens = batch_tokens or (2048 if self.device == "cpu" else 32768)
        self.share_prompts = share_prompts
        try:
            self.tokenizer = tok = AutoTokenizer.from_pretrained(model_path)
        except (OSError, ValueError) as e:  # a folder without (readable) tokenizer files
            from fusechat.errors import InputError

            raise InputError(model_path, f"no tokenizer can be loaded ({str(e).strip().splitlines()[0]})") from None
        if kind == "armorm":
            from fusechat.scoring.armorm import choose_kernel, gating_pattern_ids, load_armorm

            self.model = model if model is not None else load_armorm(model_path, dtype=self.dtype, device=self.device)
            self.pattern = gating_pattern_ids(tok)
            self.attention = choose_kernel(attention, self.device, self.dtype)
            # SDPA pads the conversations of a length bucket to its longest. On CPU one call per
            # length costs nothing next to the arithmetic, and padding would add to it; on a GPU
            # each call is a launch per layer, so lengths within 25% share one.
            self.bucket_waste = 0.25 if str(self.device).startswith("cuda") else 0.0
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

    def _trees(self, ready: list[tuple[list[int], int, bool]]):
        """[(prompt ids, gating position, [(ready index, reply ids)])]: replies of the same prompt
        tokens share a tree when prompts are shared, else every conversation is its own."""
        by_prompt: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for j, (ids, gpos, _) in enumerate(ready):
            # the prompt ends with the gating pattern; the reply keeps at least the token the
            # reward is read at
            cut = min(gpos + len(self.pattern), len(ids) - 1)
            by_prompt[tuple(ids[:cut]) if self.share_prompts else (j,)].append(j)
        trees = []
        for js in by_prompt.values():
            ids, gpos, _ = ready[js[0]]
            cut = min(gpos + len(self.pattern), len(ids) - 1)
            trees.append((ids[:cut], gpos, [(j, ready[j][0][cut:]) for j in js]))
        return trees

    def _packed(self, ready: list[tuple[list[int], int, bool]]):
        """(indices into ready, scores, objectives) per packed batch, the scores on the device
        (read back once, after the last batch: no wait for the device between batches)."""
        from fusechat.scoring.armorm import PackedBatch

        chunks = []  # (prompt, gpos, [(ready index, reply)]) within the budget
        for prompt, gpos, members in self._trees(ready):
            for part in split_tree(len(prompt), [len(r) for _, r in members], self.batch_tokens):
                chunks.append((prompt, gpos, [members[i] for i in part]))
        sizes = [len(p) + sum(len(r) for _, r in m) for p, _, m in chunks]
        for batch in pack_batches(sizes, self.batch_tokens):
            trees = [(chunks[c][0], chunks[c][1], [r for _, r in chunks[c][2]]) for c in batch]
            packed = PackedBatch.build(trees, self.attention, self.bucket_waste).to(self.device)
            score, objectives = self.model.forward_packed(packed)
            yield [j for c in batch for j, _ in chunks[c][2]], score, objectives

    def _batches(self, ready: list[tuple[list[int], int, bool]]):
        """(indices into ready, scores, objectives) per forward pass."""
        if self.kind == "armorm":
            yield from self._packed(ready)
            return
        for batch in token_batches([len(ids) for ids, _, _ in ready], self.batch_tokens):
            yield batch, *self._forward([ready[j] for j in batch])

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
        done: list[tuple[list[int], object, object]] = []
        with self._torch.inference_mode(), sdpa_kernel(backends):
            for batch, scores, objectives in self._batches(ready):
                done.append((batch, scores, objectives))
                if progress:  # on a GPU: when the batch is queued, at most a batch or so ahead
                    progress(sum(len(copies[j]) for j in batch))
        for batch, scores, objectives in _to_lists(done):
            for j, s, o in zip(batch, scores, objectives):
                truncated = ready[j][2]
                for i in copies[j]:
                    out[i] = RewardOutput(s, list(o) if o is not None else None, truncated,
                                          "input truncated to max_length" if truncated else "")
        return out  # type: ignore[return-value]


def _to_lists(done):
    """Batches' device tensors -> (indices, scores, objectives) lists, in one transfer."""
    tensors = [(b, s, o) for b, s, o in done if not isinstance(s, list)]
    if tensors:
        import torch

        scores = torch.cat([s for _, s, _ in tensors]).float().cpu().tolist()
        objectives = torch.cat([o for _, _, o in tensors]).float().cpu().tolist()
    at = 0
    for batch, s, o in done:
        if isinstance(s, list):
            yield batch, s, o
        else:
            yield batch, scores[at : at + len(batch)], objectives[at : at + len(batch)]
            at += len(batch)


# -- from the recipe: what the score and eval stages both use -------------------------------------
def resolve_model(recipe: Recipe) -> tuple[str, str]:
    """(local folder, revision) of the recipe's reward model; a local folder's revision is a content hash."""
    from pathlib import Path

    from fusechat.run import folder_fingerprint

    rm = recipe.scoring.reward_model
    ref = recipe.resolve(rm.model)
    if Path(ref).is_dir():
        return ref, rm.revision or folder_fingerprint(Path(ref))
    from huggingface_hub import snapshot_download

    local = snapshot_download(ref, revision=rm.revision, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"])
    return local, Path(local).name  # the snapshot folder is named by its commit


def recipe_scorer(recipe: Recipe, model_path: str, device: str | None = None) -> RewardScorer:
    """A `RewardScorer` of the model at `model_path` (from `resolve_model`) with the recipe's settings."""
    rm = recipe.scoring.reward_model
    return RewardScorer(model_path, kind=rm.kind, dtype=rm.dtype, device=device, max_length=rm.max_length,
                        batch_tokens=rm.batch_tokens, overlong=rm.overlong)
