"""Packed SFT against padded SFT, token by token, for each attention kernel that runs here; the
kernel choice and where it is recorded; and the one-line errors of options whose packages are
missing (DeepSpeed for `--config zero3`, bitsandbytes and CUDA for QLoRA)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fusechat.recipe import RecipeError, load_recipe
from fusechat.testing.train_data import sft_rows, write_recipe, write_split

ROOT = Path(__file__).resolve().parents[1]


def _recipe(tmp_path: Path, model: Path, family: str, **sections):
    run = tmp_path / "run"
    return load_recipe(write_recipe(tmp_path / "recipe.yaml", model, family, run, **sections)), run


def _token_losses(model, batch) -> tuple[list[list[int]], list[list[int]], list[list[float]]]:
    """Per conversation: its tokens, its labels and the loss of every token it predicts
    (0 where the label is masked), split at the packed boundaries or at the padding."""
    import torch

    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        logits = model(**inputs, use_cache=False).logits.float()
    labels = batch["labels"]
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=-100, reduction="none"
    )
    if "position_ids" in batch and "attention_mask" not in batch:  # packed: one row, restarts at 0
        pos = batch["position_ids"][0].tolist()
        starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
        pieces = [(0, s, e) for s, e in zip(starts, starts[1:]) if e - s > 1]
    else:
        lengths = batch["attention_mask"].sum(1).tolist()
        pieces = [(r, 0, n) for r, n in enumerate(lengths)]
    ids, labs, losses = [], [], []
    for r, s, e in pieces:
        ids.append(batch["input_ids"][r, s:e].tolist())
        labs.append(labels[r, s + 1:e].tolist())
        losses.append(loss[r, s:e - 1].tolist())
    return ids, labs, losses


def _by_conversation(ids, labs, losses) -> dict[tuple[int, ...], tuple[list[int], list[float]]]:
    return {tuple(i): (lab, lo) for i, lab, lo in zip(ids, labs, losses, strict=True)}


def _packed_and_padded(tiny_models, tmp_path, packed_kernel: str, padded_kernel: str = "sdpa"):
    from fusechat.train.sft import build_trainer

    r, run = _recipe(tmp_path, tiny_models["qwen2"], "qwen2", sft={"max_length": 256})
    write_split(sft_rows(14, seed=5, answer_words=(3, 40)), run / "datasets" / "sft" / "train.parquet")
    out = run / "models" / r.name / "sft"
    got = {}
    for packing, kernel in ((True, packed_kernel), (False, padded_kernel)):
        trainer, _, _ = build_trainer(r, out, packing=packing, attn_implementation=kernel)
        assert trainer.model.config._attn_implementation == kernel
        ds = trainer.train_dataset
        batch = trainer.data_collator([ds[i] for i in range(len(ds))])
        if packing:
            assert "attention_mask" not in batch and len(ds) < 14  # padding-free, several per row
        else:
            assert (batch["attention_mask"] == 0).any()  # really padded
        got[packing] = _by_conversation(*_token_losses(trainer.model.eval(), batch))
    return got


def _assert_same_tokens_and_losses(got):
    packed, padded = got[True], got[False]
    assert len(padded) == 14 and set(packed) == set(padded)  # every conversation once, intact
    for conv, (labels, losses) in padded.items():
        p_labels, p_losses = packed[conv]
        assert p_labels == labels  # same trained positions (assistant turns only)
        trained = [i for i, lab in enumerate(labels) if lab != -100]
        assert trained and len(trained) < len(labels)
        for i in trained:
            assert p_losses[i] == pytest.approx(losses[i], abs=2e-5), (i, conv[:8])


@pytest.mark.parametrize("kernel", ["sdpa", "eager"])
def test_packed_rows_have_the_padded_rows_per_token_losses(tiny_models, tmp_path, kernel):
    """Packed (padding-free) conversations get exactly the losses they get one per padded row:
    nothing leaks across the boundaries and the loss mask is the same."""
    _assert_same_tokens_and_losses(_packed_and_padded(tiny_models, tmp_path, kernel))


@pytest.mark.slow
def test_flex_attention_document_mask_matches_padded_sdpa(tiny_models, tmp_path):
    """The CUDA kernel's masking (a flex-attention block mask from the conversation boundaries),
    checked on CPU in a forward pass (flex attention has no CPU backward; compiling it takes ~30 s)."""
    _assert_same_tokens_and_losses(_packed_and_padded(tiny_models, tmp_path, "flex_attention"))


def test_kernel_choice_and_override(monkeypatch):
    from fusechat.train import attention

    monkeypatch.delenv(attention.ENV, raising=False)
    assert attention.choose(cuda=False) == "sdpa"  # flex attention trains on CUDA only
    if not any(attention._available(k, True) for k in ("flash_attention_3", "flash_attention_2")):
        assert attention.choose(cuda=True) == "flex_attention"
    monkeypatch.setenv(attention.ENV, "eager")
    assert attention.choose(cuda=False) == "eager"
    monkeypatch.setenv(attention.ENV, "flash_attention_2")
    with pytest.raises(RecipeError, match="FUSECHAT_ATTENTION=flash_attention_2: not usable here"):
        attention.choose(cuda=False)
    monkeypatch.setenv(attention.ENV, "fast")
    with pytest.raises(RecipeError, match="unknown attention kernel; expected one of flash_attention_3"):
        attention.choose()


def test_sft_run_records_its_attention_kernel(tiny_models, tmp_path):
    from fusechat.train.sft import run_sft

    r, run = _recipe(tmp_path, tiny_models["qwen2"], "qwen2", sft={"max_length": 256, "max_steps": 1})
    write_split(sft_rows(8, seed=1), run / "datasets" / "sft" / "train.parquet")
    run_sft(r)
    out = run / "models" / r.name / "sft"
    assert json.loads((out / "metrics.json").read_text())["attn_implementation"] == "sdpa"
    assert json.loads((out / "manifest.json").read_text())["extra"]["attn_implementation"] == "sdpa"


def test_missing_packages_are_one_line_errors(tiny_models, tmp_path):
    import importlib.util

    import torch

    from fusechat.train.sft import build_trainer

    r, run = _recipe(tmp_path, tiny_models["qwen2"], "qwen2")
    if importlib.util.find_spec("deepspeed") is None:
        p = subprocess.run(
            [sys.executable, "-m", "fusechat", "sft", str(tmp_path / "recipe.yaml"), "--config", "zero3"],
            capture_output=True, text=True, cwd=ROOT, timeout=120,
        )
        assert p.returncode == 2, p.stderr
        assert p.stderr.strip() == (
            "--config zero3: distributed_type DEEPSPEED needs DeepSpeed, which is not installed "
            "(pip install deepspeed; pinned in requirements/gpu.lock)"
        )
    missing = []
    if not torch.cuda.is_available():
        missing.append("a CUDA device")
    if importlib.util.find_spec("bitsandbytes") is None:
        missing.append("bitsandbytes")
    if not missing:
        pytest.skip("QLoRA has what it needs here")
    r, run = _recipe(tmp_path, tiny_models["qwen2"], "qwen2", sft={"lora": {"load_in_4bit": True}})
    with pytest.raises(RecipeError) as e:
        build_trainer(r, run / "models" / r.name / "sft")
    msg = str(e.value)
    assert msg.startswith("sft.lora.load_in_4bit: QLoRA needs ") and "\n" not in msg
    assert all(m in msg for m in missing), msg
