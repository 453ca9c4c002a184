"""ArmoRM-Llama3-8B-v0.1 in plain PyTorch: no remote code from the hub.

The published model ships as custom code (`LlamaForRewardModelWithGating`) that executes from the
hub and breaks with newer transformers. Its arithmetic is small enough to state here exactly
(RECIPE_FACTS "ArmoRM-Llama3-8B-v0.1, exactly"): a Llama backbone, a linear head to 19 objective
rewards r, a gating MLP read at the end of the prompt, a fixed transform matrix T, and
score = sum_k g_k (r @ T)_k. The backbone is transformers' own `LlamaModel`; only the heads and the
gating arithmetic are written out, and the checkpoint's keys must match them one for one. Its
attention is registered here (`packed_attention`) so that packed batches, where replies share
their prompt's tokens, give the scores of one pass per conversation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from fusechat.errors import InputError

OBJECTIVES = (
    "helpsteer-helpfulness", "helpsteer-correctness", "helpsteer-coherence", "helpsteer-complexity",
    "helpsteer-verbosity", "ultrafeedback-overall_score", "ultrafeedback-instruction_following",
    "ultrafeedback-truthfulness", "ultrafeedback-honesty", "ultrafeedback-helpfulness",
    "beavertails-is_safe", "prometheus-score", "argilla-overall_quality", "argilla-judge_lm",
    "code-complexity", "code-style", "code-explanation", "code-instruction-following",
    "code-readability",
)
ARCHITECTURE = "LlamaForRewardModelWithGating"
# The end of the last user turn: where the gating network reads the prompt. Its ids come from the
# model's own tokenizer (128009, 128006, 78191, 128007, 271 for Llama-3), never hard-coded.
GATING_PATTERN = "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"


class GatingNetwork(nn.Module):
    """hidden -> gating_hidden_dim (x n_hidden, ReLU) -> objectives; softmax(x / T) * logit_scale."""

    def __init__(self, in_features: int, out_features: int, hidden_dim: int, n_hidden: int, temperature: float):
        super().__init__()
        self.temperature = temperature
        dims = [in_features] + [hidden_dim] * n_hidden + [out_features]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.logit_scale = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return torch.softmax(x / self.temperature, dim=-1) * self.logit_scale[0]


class ArmoRM(nn.Module):
    """Parameter names mirror the checkpoint: model.*, regression_layer, reward_transform_matrix, gating.*"""

    def __init__(self, config):
        from transformers import AttentionInterface, LlamaModel

        super().__init__()
        n = config.num_objectives
        self.config = config
        AttentionInterface.register(PACKED_ATTENTION, packed_attention)
        config._attn_implementation = PACKED_ATTENTION
        self.model = LlamaModel(config)
        self.regression_layer = nn.Linear(config.hidden_size, n, bias=False)
        # a fixed matrix in the published model (not trained by gradient); a buffer keeps it so
        self.register_buffer("reward_transform_matrix", torch.zeros(n, n))
        self.gating = GatingNetwork(
            config.hidden_size, n, config.gating_hidden_dim, config.gating_n_hidden, config.gating_temperature
        )

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, gating_positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded batch -> (score [B], objective rewards [B, 19]). Attention is causal
        without a mask (`packed_attention`): right padding never reaches a real token."""
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        last = attention_mask.sum(dim=-1) - 1  # last non-pad token: the <|eot_id|> of the reply
        return self.heads(hidden[rows, last], hidden[rows, gating_positions])

    def heads(self, reward_hidden: torch.Tensor, gating_hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states at the reward and gating positions -> (score, objective rewards)."""
        rewards = self.regression_layer(reward_hidden)
        gates = self.gating(gating_hidden)
        return (gates * (rewards @ self.reward_transform_matrix)).sum(dim=-1), rewards

    def forward_packed(self, batch: "PackedBatch") -> tuple[torch.Tensor, torch.Tensor]:
        """A packed batch (each prompt's tokens once, then its replies', no padding) -> (score, rewards)
        per reply, equal to one pass per conversation: attention runs over each conversation's own
        sequence (see `packed_attention`), every other layer over the distinct tokens only."""
        ids = batch.input_ids[None]
        hidden = self.model(
            input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=batch.position_ids[None],
            use_cache=False, packed=batch,
        ).last_hidden_state[0]
        return self.heads(hidden[batch.reward_at], hidden[batch.gating_at])


# The backbone's attention, registered with transformers under this name: the rest of `LlamaModel`
# (projections, rotary positions, MLP, norms) stays transformers' own code.
PACKED_ATTENTION = "fusechat_packed"
KERNELS = ("sdpa", "varlen")


def packed_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, packed=None, **kwargs):
    """Attention of a packed batch through each conversation's own causal sequence.

    The packed row holds a prompt's tokens once and then each reply's: a reply must see its
    prompt and its own earlier tokens, nothing else. Queries, keys and values are gathered into one
    sequence per conversation (prompt + reply, the prompt's entries copied), attended causally,
    and each packed token takes its output from one of those sequences (a prompt token from any of
    its conversations: the same queries and keys give the same output in every copy). Only the
    attention is repeated per conversation, a few percent of the arithmetic at these lengths; the
    matrix products of the layers run once per distinct token.

    Without `packed` (one conversation, or a right-padded batch): plain causal attention. Right
    padding needs no mask under a causal one: a real token only sees earlier, real tokens; pad rows
    are never read. A hand-written step because transformers' packed-sequence masks cover
    separate documents, not documents that share a prefix.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if packed is None:
        return sdpa_attention_forward(module, query, key, value, None, dropout=dropout, scaling=scaling)
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [tokens, heads, head_dim]
    if packed.kernel == "varlen":
        (flat,) = packed.gather
        out = _varlen(q[flat], k[flat], v[flat], packed.cu, packed.longest, scaling, module.num_key_value_groups)
    else:
        outs = []
        for gather in packed.gather:  # one SDPA call per length bucket
            n, longest = gather.shape

            def per_conversation(x):  # [n, longest, heads, dim] -> [n, heads, longest, dim]
                return x[gather].transpose(1, 2)

            o, _ = sdpa_attention_forward(module, per_conversation(q), per_conversation(k), per_conversation(v),
                                          None, dropout=dropout, scaling=scaling, is_causal=True)
            outs.append(o.reshape(n * longest, *o.shape[2:]))
        out = torch.cat(outs) if len(outs) > 1 else outs[0]
    return out[packed.home].unsqueeze(0), None


def _varlen(q, k, v, cu, longest: int, scaling, groups: int):
    """Flash attention over the concatenated conversations (no padding); torch >= 2.10, CUDA."""
    from torch.nn.attention.varlen import varlen_attn

    kw = dict(_varlen_options())
    if "enable_gqa" not in kw and groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    if kw.pop("scale"):
        kw["scale"] = scaling
    elif scaling is not None and abs(scaling - q.shape[-1] ** -0.5) > 1e-9:
        raise ValueError("this torch's varlen attention takes no scale, and the model's is not 1/sqrt(head_dim)")
    return varlen_attn(q, k, v, cu, cu, longest, longest, **kw)


@lru_cache(maxsize=1)
def _varlen_options() -> dict:
    import inspect

    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    # torch 2.10 takes is_causal; later versions a (left, right) window, (-1, 0) being causal
    kw: dict = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    if "enable_gqa" in params:
        kw["enable_gqa"] = True
    kw["scale"] = "scale" in params  # whether the call can pass the model's own (torch 2.10 cannot)
    return kw


def choose_kernel(kernel: str, device, dtype: torch.dtype) -> str:
    """"sdpa"; "varlen" (flash attention over the concatenated conversations, no padding), an error
    where it does not work here; "auto": varlen where it works, SDPA otherwise."""
    if kernel not in ("auto", *KERNELS):
        raise ValueError(f"attention kernel must be auto or one of {KERNELS}, got {kernel!r}")
    if kernel == "sdpa":
        return kernel
    why = _varlen_fails(torch.device(device), dtype)
    if why and kernel == "varlen":
        raise ValueError(f"varlen attention does not work here: {why}")
    return "sdpa" if why else "varlen"


@lru_cache(maxsize=None)
def _varlen_fails(device: torch.device, dtype: torch.dtype) -> str:
    """Why varlen attention cannot be used on this device and dtype ("" if it can): it must exist
    in this torch and agree with SDPA on random inputs of several lengths."""
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return f"flash attention needs CUDA and bfloat16 or float16, not {device.type} {dtype}"
    try:
        import torch.nn.functional as F

        g = torch.Generator(device=device).manual_seed(0)
        lengths = [37, 300, 5]
        q, k, v = (torch.randn(sum(lengths), h, 64, generator=g, device=device, dtype=dtype) for h in (8, 2, 2))
        starts = [0, 37, 337, 342]
        got = _varlen(q, k, v, torch.tensor(starts, device=device, dtype=torch.int32), max(lengths), None, 4)
        for a, b in zip(starts[:-1], starts[1:]):
            ref = F.scaled_dot_product_attention(
                q[a:b].transpose(0, 1), k[a:b].transpose(0, 1).repeat_interleave(4, 0),
                v[a:b].transpose(0, 1).repeat_interleave(4, 0), is_causal=True).transpose(0, 1)
            if not torch.allclose(got[a:b].float(), ref.float(), atol=2e-2, rtol=2e-2):
                return "its output differs from SDPA's on a random check"
    except Exception as e:  # noqa: BLE001 - a torch without a working varlen kernel here falls back
        return f"{type(e).__name__}: {e}"[:200]
    return ""


@dataclass
class PackedBatch:
    """One packed batch: `trees` = [(prompt ids, gating position in it, [reply ids, ...])].

    input_ids / position_ids: each prompt's tokens, then each of its replies' (a reply's positions
    continue from its prompt's length, as in one pass over the conversation). reward_at /
    gating_at: per reply, its last token and its prompt's gating token. For the attention, with
    kernel "sdpa": `gather`, per length bucket, [conversations, longest] packed indices of each
    conversation's tokens (padding slots repeat index 0; their output is never read); with
    "varlen": one flat index of the concatenated conversations and `cu` their cumulative lengths.
    `home`: the slot (over the buckets' flattened slots, in order) each packed token reads its
    output from.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    reward_at: torch.Tensor
    gating_at: torch.Tensor
    gather: tuple[torch.Tensor, ...]
    home: torch.Tensor
    cu: torch.Tensor | None
    longest: int
    kernel: str

    @classmethod
    def build(cls, trees: list[tuple[list[int], int, list[list[int]]]], kernel: str,
              bucket_waste: float = 0.0) -> "PackedBatch":
        """`bucket_waste` (sdpa): conversations padded together while the shortest is at least
        (1 - waste) x the longest of its bucket; 0 gives one call per distinct length, no padding."""
        ids: list[int] = []
        pos: list[int] = []
        reward_at, gating_at, seqs = [], [], []  # seqs: per conversation, (prompt start, prompt length, reply start, reply length)
        for prompt, gpos, replies in trees:
            p0, n = len(ids), len(prompt)
            ids += prompt
            pos += range(n)
            for reply in replies:
                r0 = len(ids)
                ids += reply
                pos += range(n, n + len(reply))
                reward_at.append(r0 + len(reply) - 1)
                gating_at.append(p0 + gpos)
                seqs.append((p0, n, r0, len(reply)))

        def tokens(p0, n, r0, m):
            return torch.cat([torch.arange(p0, p0 + n), torch.arange(r0, r0 + m)])

        home = torch.empty(len(ids), dtype=torch.long)
        length = [n + m for _, n, _, m in seqs]
        starts = [0] * len(seqs)  # each conversation's first slot
        if kernel == "varlen":
            gather = (torch.cat([tokens(*c) for c in seqs]),)
            for i in range(1, len(seqs)):
                starts[i] = starts[i - 1] + length[i - 1]
            cu = torch.tensor(starts + [starts[-1] + length[-1]])
        else:
            buckets: list[list[int]] = []  # longest first; a bucket's first is its longest
            for i in sorted(range(len(seqs)), key=lambda i: -length[i]):
                if buckets and length[i] >= (1 - bucket_waste) * length[buckets[-1][0]]:
                    buckets[-1].append(i)
                else:
                    buckets.append([i])
            gather, at = [], 0
            for bucket in buckets:
                width = length[bucket[0]]
                g = torch.zeros(len(bucket), width, dtype=torch.long)
                for row, i in enumerate(bucket):
                    g[row, : length[i]] = tokens(*seqs[i])
                    starts[i] = at + row * width
                gather.append(g)
                at += len(bucket) * width
            gather, cu = tuple(gather), None
        # a prompt's tokens read the last copy written here, a reply's tokens their only one; any
        # copy of a prompt is the same computation
        for (p0, n, r0, m), s in zip(seqs, starts):
            home[p0 : p0 + n] = torch.arange(s, s + n)
            home[r0 : r0 + m] = torch.arange(s + n, s + n + m)
        return cls(torch.tensor(ids), torch.tensor(pos), torch.tensor(reward_at), torch.tensor(gating_at),
                   gather, home, cu, max(length), kernel)

    def to(self, device) -> "PackedBatch":
        """The batch on `device` in one copy; from pinned memory on CUDA, so the host does not wait."""
        parts = [self.input_ids, self.position_ids, self.reward_at, self.gating_at, self.home, *self.gather]
        parts += [self.cu] if self.cu is not None else []
        flat = torch.cat([p.reshape(-1) for p in parts])
        if torch.device(device).type == "cuda":
            flat = flat.pin_memory().to(device, non_blocking=True)
        else:
            flat = flat.to(device)
        moved, at = [], 0
        for p in parts:
            moved.append(flat[at : at + p.numel()].view(p.shape))
            at += p.numel()
        ids, pos, reward_at, gating_at, home = moved[:5]
        gather = tuple(moved[5 : 5 + len(self.gather)])
        cu = moved[-1].to(torch.int32) if self.cu is not None else None
        return PackedBatch(ids, pos, reward_at, gating_at, gather, home, cu, self.longest, self.kernel)


# A reward-model folder that is not in ArmoRM's layout or cannot be read: bad input like any other
# (the CLI's one line naming the file, exit 2); the name earlier versions raised.
CheckpointError = InputError


def gating_pattern_ids(tokenizer) -> list[int]:
    ids = tokenizer(GATING_PATTERN, add_special_tokens=False)["input_ids"]
    if ids[0] != tokenizer.convert_tokens_to_ids("<|eot_id|>"):
        raise CheckpointError(
            f"tokenizer of {getattr(tokenizer, 'name_or_path', '?')} has no <|eot_id|> token: "
            "ArmoRM needs the Llama-3 chat format"
        )
    return ids


def find_gating_position(ids: list[int], pattern: list[int]) -> int:
    """Start of the last occurrence of `pattern` in `ids` (ArmoRM's find_token_for_gating)."""
    k, first = len(pattern), pattern[0]
    for j in range(len(ids) - k, -1, -1):
        if ids[j] == first and ids[j : j + k] == pattern:
            return j
    raise ValueError(
        "ArmoRM gating token pattern <|eot_id|><|start_header_id|>assistant<|end_header_id|>\\n\\n "
        "not found: the input is not a Llama-3 chat with a user turn followed by an assistant turn"
    )


def _read_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """The checkpoint's tensors, and the file that lists them (the index, or the one weights file)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(index, f"not a safetensors index with a weight_map ({type(e).__name__}: {e})") from None
        listed = index
    elif (path / "model.safetensors").is_file():
        files, listed = ["model.safetensors"], path / "model.safetensors"
    else:
        raise CheckpointError(path, "no model.safetensors or model.safetensors.index.json")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        if not (path / f).is_file():
            raise CheckpointError(index, f"lists {f}, which is not in the folder")
        try:
            state.update(load_file(str(path / f)))
        except SafetensorError as e:
            why = str(e).removeprefix("Error while deserializing header: ")
            raise CheckpointError(path / f, f"not a complete safetensors file ({why}): an incomplete download or copy?") from None
        except OSError as e:
            raise CheckpointError(path / f, f"cannot be read ({e.strerror or e})") from None
    return state, listed


def load_armorm(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> ArmoRM:
    """Build ArmoRM from `config.json` and load its safetensors; any key mismatch is an error."""
    from transformers import LlamaConfig

    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():  # transformers would fall back to a default config without one
        raise CheckpointError(config_file, "missing: a reward-model folder holds its config.json")
    try:
        config = LlamaConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise CheckpointError(config_file, f"cannot be read ({str(e).splitlines()[0]})") from None
    if ARCHITECTURE not in (config.architectures or []):
        raise CheckpointError(config_file, f"architectures {config.architectures}, expected {ARCHITECTURE!r}")
    for key in ("num_objectives", "gating_temperature", "gating_hidden_dim", "gating_n_hidden"):
        if not hasattr(config, key):
            raise CheckpointError(config_file, f"missing ArmoRM field {key!r}")
    with torch.device("meta"):  # no random initialisation of 8B parameters that are overwritten anyway
        model = ArmoRM(config)
    state, listed = _read_state_dict(path)
    expected = set(model.state_dict())
    missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or extra:
        raise CheckpointError(
            listed, "checkpoint does not match the ArmoRM layout: "
            f"{len(missing)} missing key(s) {missing[:10]}, {len(extra)} unexpected key(s) {extra[:10]}"
        )
    model.load_state_dict(state, strict=True, assign=True)
    return to_dtype(model, dtype, device).eval()


def to_dtype(model: ArmoRM, dtype: torch.dtype, device: str | torch.device | None = None) -> ArmoRM:
    """The model cast to `dtype` (and moved); the rotary frequencies, a non-persistent buffer,
    are rebuilt in float32 as transformers' own loading keeps them."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    device = device or next(model.parameters()).device
    model.model.rotary_emb = LlamaRotaryEmbedding(model.config)  # also leaves the meta device
    model = model.to(device=device, dtype=dtype)
    model.model.rotary_emb = LlamaRotaryEmbedding(model.config).to(device)
    return model
