"""ArmoRM-Llama3-8B-v0.1 in plain PyTorch: no remote code from the hub.

The published model ships as custom code (`LlamaForRewardModelWithGating`) that executes from the
hub and breaks with newer transformers. Its arithmetic is small enough to state here exactly
(RECIPE_FACTS "ArmoRM-Llama3-8B-v0.1, exactly"): a Llama backbone, a linear head to 19 objective
rewards r, a gating MLP read at the end of the prompt, a fixed transform matrix T, and
score = sum_k g_k (r @ T)_k. The backbone is transformers' own `LlamaModel`; only the heads and the
gating arithmetic are written out, and the checkpoint's keys must match them one for one.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from fusechat.errors import FusechatError

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
        from transformers import LlamaModel

        super().__init__()
        n = config.num_objectives
        self.config = config
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
        """Right-padded batch -> (score [B], objective rewards [B, 19])."""
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        last = attention_mask.sum(dim=-1) - 1  # last non-pad token: the <|eot_id|> of the reply
        return self.heads(hidden[rows, last], hidden[rows, gating_positions])

    def heads(self, reward_hidden: torch.Tensor, gating_hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states at the reward and gating positions -> (score, objective rewards)."""
        rewards = self.regression_layer(reward_hidden)
        gates = self.gating(gating_hidden)
        return (gates * (rewards @ self.reward_transform_matrix)).sum(dim=-1), rewards

    def encode_prompts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """Right-padded prompts -> (hidden states, key/value cache that replies continue from)."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True)
        return out.last_hidden_state, out.past_key_values

    def continue_prompts(
        self, cache, prompt_mask: torch.Tensor, prompt_rows: torch.Tensor,
        input_ids: torch.Tensor, attention_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Right-padded replies, row i after cached prompt `prompt_rows[i]` -> their hidden states.

        The same causal attention over the same tokens as one pass over prompt + reply: the reply's
        positions start at its prompt's length, and the prompt's padding slots are masked out.
        """
        from transformers import DynamicCache

        past = DynamicCache(config=self.config)
        for layer_idx, layer in enumerate(cache.layers):
            past.update(layer.keys[prompt_rows], layer.values[prompt_rows], layer_idx)
        prompt_mask = prompt_mask[prompt_rows]
        steps = torch.arange(input_ids.shape[1], device=input_ids.device)
        positions = prompt_mask.sum(dim=-1, keepdim=True) + steps
        return self.model(
            input_ids=input_ids, attention_mask=torch.cat([prompt_mask, attention_mask], dim=1),
            position_ids=positions, past_key_values=past, use_cache=True,
        ).last_hidden_state


class CheckpointError(FusechatError, ValueError):
    """A reward-model folder that is not in ArmoRM's layout; names the file and the keys."""


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


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(path / f)))
    return state


def load_armorm(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> ArmoRM:
    """Build ArmoRM from `config.json` and load its safetensors; any key mismatch is an error."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    path = Path(path)
    config = LlamaConfig.from_pretrained(path)
    if ARCHITECTURE not in (config.architectures or []):
        raise CheckpointError(f"{path}/config.json: architectures {config.architectures}, expected {ARCHITECTURE!r}")
    for key in ("num_objectives", "gating_temperature", "gating_hidden_dim", "gating_n_hidden"):
        if not hasattr(config, key):
            raise CheckpointError(f"{path}/config.json: missing ArmoRM field {key!r}")
    with torch.device("meta"):  # no random initialisation of 8B parameters that are overwritten anyway
        model = ArmoRM(config)
    state = _read_state_dict(path)
    expected = set(model.state_dict())
    missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or extra:
        raise CheckpointError(
            f"{path}: checkpoint does not match the ArmoRM layout: "
            f"{len(missing)} missing key(s) {missing[:10]}, {len(extra)} unexpected key(s) {extra[:10]}"
        )
    model.load_state_dict(state, strict=True, assign=True)
    # The rotary frequencies are a non-persistent buffer, still on the meta device; rebuilt after
    # the cast so that they stay float32 as in transformers' own loading.
    model.model.rotary_emb = LlamaRotaryEmbedding(config)
    model = model.to(device=device, dtype=dtype)
    model.model.rotary_emb = LlamaRotaryEmbedding(config).to(device)
    return model.eval()
