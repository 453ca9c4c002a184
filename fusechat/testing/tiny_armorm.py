"""A tiny reward model in ArmoRM-Llama3-8B-v0.1's exact checkpoint layout, with random weights.

Same keys, shapes (scaled down), config fields and tokenizer conventions as the published model
(RECIPE_FACTS "ArmoRM-Llama3-8B-v0.1, exactly"): a Llama backbone without LM head whose vocabulary
is the Llama-3 tokenizer plus one added `[PAD]`, `regression_layer.weight` [19, hidden],
`reward_transform_matrix` [19, 19], `gating.layers.{0..3}` (hidden -> g -> g -> g -> 19) and
`gating.logit_scale`. Tests, benches and the demo score with it offline.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from fusechat.run import atomic_dir

_MARKER = "tiny-armorm-build.json"
NUM_OBJECTIVES = 19


def _builder_hash() -> str:
    import hashlib

    from fusechat.testing import tiny

    # a change to this module or to the tokenizer builder invalidates earlier builds
    blob = Path(__file__).read_bytes() + Path(tiny.__file__).read_bytes()
    return hashlib.sha256(blob).hexdigest()[:16]


def build_tiny_armorm(
    out_dir: Path | str, *, hidden_size: int = 128, num_layers: int = 2, gating_hidden_dim: int = 64, seed: int = 0,
    chat_template: str | None = None,
) -> Path:
    """Write the checkpoint, config.json and tokenizer to `out_dir` (reused when already built).
    `chat_template` replaces the tokenizer's (tests pass Meta-Llama-3's, which ArmoRM ships)."""
    out_dir = Path(out_dir)
    params = dict(hidden_size=hidden_size, num_layers=num_layers, gating_hidden_dim=gating_hidden_dim,
                  seed=seed, builder=_builder_hash())
    if chat_template is not None:
        params["chat_template"] = hashlib.sha256(chat_template.encode()).hexdigest()[:16]
    marker = out_dir / _MARKER
    if marker.is_file() and json.loads(marker.read_text()) == params:
        return out_dir
    if out_dir.exists() and any(out_dir.iterdir()) and not marker.is_file():
        raise FileExistsError(f"{out_dir} is not empty and holds no tiny ArmoRM build; refusing to overwrite it")

    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaModel

    from fusechat.testing.tiny import MAX_POSITIONS, build_tokenizer

    tok = build_tokenizer("llama3", chat_template)
    tok.add_special_tokens({"pad_token": "[PAD]"})  # ArmoRM: vocabulary + one [PAD] (id 128256 there)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=MAX_POSITIONS, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        # wider than 0.02 so that scores of different texts differ visibly
        initializer_range=0.1,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.convert_tokens_to_ids("<|eot_id|>"),
        pad_token_id=tok.pad_token_id, tie_word_embeddings=False,
    )
    config.architectures = ["LlamaForRewardModelWithGating"]
    config.num_objectives = NUM_OBJECTIVES
    config.gating_temperature = 10
    config.gating_hidden_dim = gating_hidden_dim
    config.gating_n_hidden = 3

    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone = LlamaModel(config)
    state = {f"model.{k}": v.contiguous() for k, v in backbone.state_dict().items()}
    state["regression_layer.weight"] = torch.randn(NUM_OBJECTIVES, hidden_size, generator=g) * 0.1
    # the published matrix is close to the identity with small off-diagonal mixing
    state["reward_transform_matrix"] = torch.eye(NUM_OBJECTIVES) + 0.05 * torch.randn(
        NUM_OBJECTIVES, NUM_OBJECTIVES, generator=g
    )
    dims = [hidden_size] + [gating_hidden_dim] * 3 + [NUM_OBJECTIVES]
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        state[f"gating.layers.{i}.weight"] = torch.randn(b, a, generator=g) / a**0.5
        state[f"gating.layers.{i}.bias"] = torch.randn(b, generator=g) * 0.1
    state["gating.logit_scale"] = torch.tensor([1.7])

    with atomic_dir(out_dir) as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / _MARKER).write_text(json.dumps(params, indent=2) + "\n")
    return out_dir
