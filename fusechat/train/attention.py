"""Which attention kernel SFT and DPO train with, chosen from what the machine has.

Packed SFT rows (TRL's padding-free `bfd` packing) reach the model as one long row whose
`position_ids` restart at every conversation, with the boundaries also given as `cu_seq_lens_*`.
transformers keeps the conversations apart with every kernel, but what that costs differs:

- `flash_attention_3` / `flash_attention_2` (the `flash-attn` packages): the variable-length kernel
  runs on the boundaries, so attention costs per real token. Used where one is installed.
- `flex_attention` (in torch itself): a block mask built from the conversation index of every token
  (`transformers.masking_utils.find_packed_sequence_indices`); tiles outside a conversation are
  skipped, so the cost is per real token up to 128-token tiles. The CUDA choice when flash-attn is
  absent (PyPI has no flash-attn wheel for the locked torch; see requirements/gpu.lock). Its kernel is
  compiled on first use (tens of seconds once per run).
- `sdpa`: a dense block-diagonal mask over the whole packed row. Right, but every token pays for the
  full row length and the mask rules out the fused flash backend. The choice on CPU, where flex
  attention has no backward pass (torch 2.13: "FlexAttention does not support backward on CPU").

Padded batches (SFT without packing, DPO: TRL 1.16 turns padding-free DPO off) use the same kernel
with a padding mask; flash and flex skip padded keys there too.

`FUSECHAT_ATTENTION=<name>` overrides the choice (for a kernel that fails on some card or build).
The chosen name is recorded in each stage's `metrics.json` and manifest.
"""

from __future__ import annotations

import importlib.util
import os

from fusechat.recipe import RecipeError

KERNELS = ("flash_attention_3", "flash_attention_2", "flex_attention", "sdpa", "eager")
ENV = "FUSECHAT_ATTENTION"


def _available(name: str, cuda: bool) -> bool:
    from transformers.utils import import_utils as iu

    if name == "flash_attention_3":
        return cuda and importlib.util.find_spec("flash_attn_interface") is not None and iu.is_flash_attn_3_available()
    if name == "flash_attention_2":
        return cuda and importlib.util.find_spec("flash_attn") is not None and iu.is_flash_attn_2_available()
    if name == "flex_attention":
        return cuda and iu.is_torch_flex_attn_available()
    return True  # sdpa and eager run everywhere


def choose(cuda: bool | None = None) -> str:
    """The attention implementation to load the model with: the override if set, else the first
    of KERNELS that this machine can train with."""
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    wanted = os.environ.get(ENV, "").strip()
    if wanted:
        if wanted not in KERNELS:
            raise RecipeError(f"{ENV}={wanted}: unknown attention kernel; expected one of {', '.join(KERNELS)}")
        if not _available(wanted, cuda):
            raise RecipeError(
                f"{ENV}={wanted}: not usable here ({'no CUDA device' if not cuda else 'its package is not installed'})"
            )
        return wanted
    return next(k for k in KERNELS if _available(k, cuda))


def used_by(trainer) -> str | None:
    """The kernel the trainer's model really runs (transformers may refuse or remap a request)."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    return getattr(model.config, "_attn_implementation", None)
