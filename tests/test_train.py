"""SFT and DPO with TRL on tiny models (CPU): loss masks, the length-normalized DPO loss, the two
stages end to end, two-process data parallel, and resuming an interrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fusechat.recipe import RecipeError, load_recipe
from fusechat.testing.tiny import FAMILIES, build_tiny_lm
from fusechat.testing.train_data import dpo_rows, sft_rows, write_datasets, write_recipe, write_split

ROOT = Path(__file__).resolve().parents[1]


def _recipe(tmp_path: Path, model: Path, family: str, **sections):
    run = tmp_path / "run"
    return load_recipe(write_recipe(tmp_path / "recipe.yaml", model, family, run, **sections)), run


def _spans(ids: list[int], labels: list[int]) -> list[list[int]]:
    """Runs of consecutive trained positions (label != -100)."""
    spans, cur = [], []
    for i, lab in zip(ids, labels, strict=True):
        if lab != -100:
            cur.append(i)
        elif cur:
            spans.append(cur)
            cur = []
    return spans + ([cur] if cur else [])


@pytest.mark.parametrize("family", FAMILIES)
def test_loss_covers_exactly_the_assistant_turns(tiny_models, tmp_path, family):
    from fusechat.train.sft import build_trainer

    r, run = _recipe(tmp_path, tiny_models[family], family, sft={"max_length": 512})
    rows = sft_rows(12, seed=3)
    write_split(rows, run / "datasets" / "sft" / "train.parquet")
    trainer, _, _ = build_trainer(r, run / "models" / r.name / "sft")
    tok = trainer.processing_class
    ds = trainer.train_dataset
    assert len(ds) < len(rows)  # packed: several conversations per training sequence

    # the batch exactly as the trainer collates it (packed, padding-free)
    batch = trainer.data_collator([ds[i] for i in range(len(ds))])
    got = _spans(batch["input_ids"][0].tolist(), batch["labels"][0].tolist())
    expected = [m["content"] for row in rows for m in row["messages"] if m["role"] == "assistant"]
    assert len(got) == len(expected)
    special = {i for i, t in tok.added_tokens_decoder.items() if t.special}
    texts = []
    for span in got:
        # each trained span ends with the turn's end token, so the model learns to stop ...
        assert span[-1] in special, tok.decode(span)
        # ... and holds nothing but the assistant's words (a byte-level merge may pull in the one
        # space the template puts between the header and the content, as in Mistral's "[/INST] ")
        text = tok.decode(span[:-1])
        assert text in {text.strip(), " " + text.strip()}, text
        texts.append(text.strip())
    assert sorted(texts) == sorted(expected)


def test_packed_conversations_do_not_see_each_other(tiny_models, tmp_path):
    """The loss of a packed batch equals that of the same conversations padded one per row: packed
    sequences are isolated from each other (a model called with its KV cache on would let them
    attend across boundaries)."""
    import torch

    from fusechat.train.sft import build_trainer

    r, run = _recipe(tmp_path, tiny_models["llama3"], "llama3", sft={"max_length": 512})
    write_split(sft_rows(10, seed=4), run / "datasets" / "sft" / "train.parquet")
    losses = {}
    for packing in (True, False):
        trainer, _, _ = build_trainer(r, run / "models" / r.name / "sft", packing=packing)
        ds = trainer.train_dataset
        batch = trainer.data_collator([ds[i] for i in range(len(ds))])
        with torch.no_grad():
            losses[packing] = trainer.compute_loss(trainer.model.eval(), batch).item()
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)


def test_length_normalized_dpo_loss_matches_hand_computation(tiny_models, tmp_path):
    import torch
    import torch.nn.functional as F
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    from fusechat.train.common import load_tokenizer

    policy_dir = tiny_models["llama3"]
    ref_dir = build_tiny_lm("llama3", tmp_path / "ref", seed=1)  # a different reference model
    tok = load_tokenizer(str(policy_dir))
    policy = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32)
    rows = dpo_rows(4, seed=5)
    for i, row in enumerate(rows):  # unequal lengths make the normalization matter
        row["rejected"][0]["content"] += " and more" * i
    beta = 0.5
    args = DPOConfig(
        output_dir=str(tmp_path / "out"), loss_type=["sigmoid_norm"], beta=beta, use_cpu=True, bf16=False,
        gradient_checkpointing=False, report_to="none", per_device_train_batch_size=4, max_length=512,
    )
    ds = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    trainer = DPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=ds, processing_class=tok)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, batch).item()

    def completion_logp(model, prompt, completion) -> tuple[float, int]:
        p = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False)
        full = tok.apply_chat_template(prompt + completion, tokenize=True, return_dict=False)
        assert full[: len(p)] == p
        ids = torch.tensor([full])
        with torch.no_grad():
            logps = F.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
        token_logps = logps.gather(1, ids[0, 1:, None])[:, 0]
        return token_logps[len(p) - 1 :].sum().item(), len(full) - len(p)

    losses, unnormalized = [], []
    for row in rows:
        w, n_w = completion_logp(policy, row["prompt"], row["chosen"])
        w_ref, _ = completion_logp(ref, row["prompt"], row["chosen"])
        l, n_l = completion_logp(policy, row["prompt"], row["rejected"])
        l_ref, _ = completion_logp(ref, row["prompt"], row["rejected"])
        z = beta / n_w * (w - w_ref) - beta / n_l * (l - l_ref)
        losses.append(-F.logsigmoid(torch.tensor(z)).item())
        unnormalized.append(-F.logsigmoid(torch.tensor(beta * ((w - w_ref) - (l - l_ref)))).item())
    hand = sum(losses) / len(losses)
    assert trl_loss == pytest.approx(hand, rel=1e-4, abs=1e-5)
    assert abs(hand - sum(unnormalized) / len(unnormalized)) > 1e-3  # the normalization is not a no-op


def _tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.mark.slow
def test_sft_then_dpo_end_to_end(tiny_models, tmp_path):
    from fusechat.train.dpo import run_dpo
    from fusechat.train.sft import run_sft

    model = tiny_models["llama3"]
    r, run = _recipe(
        tmp_path, model, "llama3", sft={"max_length": 256, "report_to": ["tensorboard"]},
        dpo={"max_length": 256, "loss_type": "sigmoid_norm", "beta": 2.0, "save_steps": 5},
    )
    write_datasets(run, sft=(48, 8), dpo=(64, 16), long_every=8)

    m_sft = run_sft(r)
    assert m_sft.dropped["longer_than_max_length"] == 6  # one long answer in 8, dropped and counted
    assert m_sft.rows_in == 48 == m_sft.rows_out + sum(m_sft.dropped.values())
    sft_dir = run / "models" / r.name / "sft"
    assert list((sft_dir / "checkpoints").glob("runs/*/events.out.tfevents.*"))  # report_to: tensorboard
    base, sft = _tensors(model), _tensors(sft_dir)
    assert any((base[k] - sft[k]).abs().max() > 0 for k in base)

    m_dpo = run_dpo(r)
    assert m_dpo.rows_in == 64 == m_dpo.rows_out + m_dpo.dropped["longer_than_max_length"]
    dpo = _tensors(run / "models" / r.name / "dpo")
    assert any((sft[k] - dpo[k]).abs().max() > 0 for k in sft)

    metrics = json.loads((run / "models" / r.name / "dpo" / "metrics.json").read_text())
    # chosen answers share one pattern, rejected another: held-out pairs must be told apart
    assert metrics["eval_rewards/accuracies"] >= 0.8
    # the better of the last two checkpoints by held-out loss, and its metrics are the ones reported
    cands = metrics["candidates"]
    assert len(cands) == 2
    best = min(cands, key=lambda c: c["eval_loss"])
    assert metrics["selected_checkpoint"] == best["checkpoint"]
    assert metrics["eval_loss"] == pytest.approx(best["eval_loss"])

    card = (run / "models" / r.name / "dpo" / "README.md").read_text()
    assert r.content_hash() in card
    assert metrics["data"]["train"]["rows"] == 64 and metrics["data"]["train"]["sha256"] in card
    saved = json.loads((run / "models" / r.name / "dpo" / "manifest.json").read_text())
    assert saved["recipe_hash"] == r.content_hash()


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    return env


@pytest.mark.slow
def test_two_process_data_parallel_sft_and_dpo(tiny_models, tmp_path):
    recipe = write_recipe(
        tmp_path / "recipe.yaml", tiny_models["qwen2"], "qwen2", tmp_path / "run",
        dpo={"precompute_ref_log_probs": True},
    )
    write_datasets(tmp_path / "run", sft=(32, 0), dpo=(32, 8))
    for stage in ("sft", "dpo"):
        cmd = [sys.executable, "-m", "fusechat.train.launch", stage, str(recipe), "--nproc", "2"]
        p = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        assert f"[rank 0/2] {stage}:" in p.stderr and f"[rank 1/2] {stage}:" in p.stderr
        metrics = json.loads((tmp_path / "run" / "models" / "tiny-qwen2" / stage / "metrics.json").read_text())
        assert metrics["world_size"] == 2 and metrics["ranks"] == [0, 1]
        # global batch 4 = 2 per device x 2 processes: no accumulation
        assert metrics["gradient_accumulation_steps"] == 1


def test_launch_commands():
    from fusechat.train.launch import build_command

    cmd = build_command("sft", "r.yaml", nproc=2)
    assert cmd[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                       "-m", "fusechat.train.sft", "r.yaml"]
    cmd = build_command("dpo", "r.yaml", nproc=8, config="fsdp", nnodes=2, node_rank=1, master_addr="10.0.0.1")
    assert cmd[cmd.index("--num_processes") + 1] == "16" and cmd[cmd.index("--machine_rank") + 1] == "1"
    assert Path(cmd[cmd.index("--config_file") + 1]).name == "fsdp.yaml"
    assert cmd[-3:] == ["--module", "fusechat.train.dpo", "r.yaml"]
    with pytest.raises(SystemExit, match="neither a shipped config"):
        build_command("sft", "r.yaml", nproc=2, config="nope")


@pytest.mark.slow
def test_interrupted_sft_resumes_from_its_last_checkpoint(tiny_models, tmp_path):
    from transformers import TrainerCallback

    from fusechat.train import common
    from fusechat.train.sft import build_trainer

    recipe = write_recipe(
        tmp_path / "recipe.yaml", tiny_models["llama3"], "llama3", tmp_path / "run",
        sft={"max_steps": 40, "save_steps": 3, "save_total_limit": 50},
    )
    write_datasets(tmp_path / "run", sft=(48, 0))
    ckpts = tmp_path / "run" / "models" / "tiny-llama3" / "sft" / "checkpoints"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fusechat.train.sft", str(recipe)], cwd=ROOT, env=_env(),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        deadline = time.time() + 300
        while common.last_complete_checkpoint(ckpts) is None if ckpts.exists() else True:
            assert proc.poll() is None and time.time() < deadline, "no checkpoint before the run ended"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done = common.last_complete_checkpoint(ckpts)
    step = int(done.name.split("-")[1])
    assert 0 < step < 40
    (ckpts / "checkpoint-39").mkdir()  # a save cut short: no trainer_state.json, must be skipped

    class Steps(TrainerCallback):
        steps: list[int] = []

        def on_step_end(self, args, state, control, **kw):
            self.steps.append(state.global_step)

    r = load_recipe(recipe)
    trainer, paths, _ = build_trainer(r, tmp_path / "run" / "models" / r.name / "sft")
    trainer.add_callback(Steps)
    key = common.run_key(r.sft, r.resolve(r.target.model), paths)
    _, resumed = common.train_resuming(trainer, key)
    assert resumed == step
    assert Steps.steps == list(range(step + 1, 41))  # continued after the checkpoint, not from 0
    # the same folder under other settings or data: never resumed; the old checkpoints move aside
    Steps.steps.clear()
    trainer.args.max_steps = 4
    _, resumed = common.train_resuming(trainer, "another run")
    assert resumed == 0 and Steps.steps == [1, 2, 3, 4]
    previous = ckpts.with_name("checkpoints.previous")
    assert (previous / "fusechat-run-key.txt").read_text() == key
    assert common.last_complete_checkpoint(previous).name == "checkpoint-40"
    assert common.last_complete_checkpoint(ckpts).name == "checkpoint-4"


def test_bad_rows_and_settings_are_clear_errors(tiny_models, tmp_path, monkeypatch):
    import torch

    from fusechat.train.dpo import run_dpo
    from fusechat.train.sft import run_sft

    r, run = _recipe(tmp_path, tiny_models["llama3"], "llama3")
    with pytest.raises(RecipeError, match=r"sft/train.parquet: missing; run `fusechat build` first"):
        run_sft(r)
    rows = sft_rows(4)
    rows[2]["messages"] = [{"role": "user", "content": "hi"}]
    write_split(rows, run / "datasets" / "sft" / "train.parquet")
    with pytest.raises(RecipeError, match=r"train.parquet: row 2: messages: no assistant turn"):
        run_sft(r)
    with pytest.raises(RecipeError, match="no SFT model; run `fusechat sft` first"):
        run_dpo(r)

    r, _ = _recipe(tmp_path, tiny_models["llama3"], "llama3", sft={"global_batch_size": 6, "per_device_batch_size": 3})
    with monkeypatch.context() as m:
        m.setenv("WORLD_SIZE", "4")
        with pytest.raises(RecipeError, match=r"global_batch_size \(6\) is not a multiple of .* processes \(4\)"):
            run_sft(r)

    if torch.cuda.is_available():
        return

    r, _ = _recipe(tmp_path, tiny_models["llama3"], "llama3", sft={"lora": {"load_in_4bit": True}})
    write_split(sft_rows(4), run / "datasets" / "sft" / "train.parquet")
    with pytest.raises(RecipeError, match="QLoRA needs a CUDA device"):
        run_sft(r)


def test_lora_sft_writes_a_merged_plain_model(tiny_models, tmp_path):
    from transformers import AutoModelForCausalLM

    from fusechat.train.sft import run_sft

    model = tiny_models["mistral"]
    r, run = _recipe(tmp_path, model, "mistral", sft={"max_length": 256, "lora": {"r": 4, "alpha": 8}})
    write_datasets(run, sft=(16, 0), dpo=(0, 0))
    run_sft(r)
    out = run / "models" / r.name / "sft"
    assert (out / "adapter" / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out)  # a plain folder: no peft needed to load it
    assert not hasattr(merged, "peft_config")
    base, tuned = _tensors(model), _tensors(out)
    assert set(base) == set(tuned)
    changed = [k for k in base if (base[k] - tuned[k]).abs().max() > 0]
    assert changed and all("proj" in k for k in changed)  # only the adapted linear layers moved


def test_preference_rows_are_checked_field_by_field():
    from fusechat.train.common import check_dpo_row

    good = dpo_rows(1)[0]
    check_dpo_row(good, "x")
    bad = dict(good, chosen=[{"role": "user", "content": "blue."}])
    with pytest.raises(RecipeError, match=r"f.parquet: row 7: chosen\[0\]: expected \{role: assistant"):
        check_dpo_row(bad, "f.parquet: row 7")
    bad = dict(good, prompt=good["prompt"] + good["chosen"])
    with pytest.raises(RecipeError, match="prompt: the last message must be a user turn"):
        check_dpo_row(bad, "f.parquet: row 0")
    bad = dict(good, rejected=good["rejected"] * 2)
    with pytest.raises(RecipeError, match="rejected: expected exactly one non-empty assistant message"):
        check_dpo_row(bad, "f.parquet: row 0")


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_dpo_loads_the_kept_checkpoint_through_public_apis(tiny_models, tmp_path, lora):
    # what run_dpo does when the better checkpoint is not the last: its weights, exactly, in the trainer's model
    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from fusechat.train.dpo import load_checkpoint

    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama3"])
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    trainer = Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True,
                                                          report_to="none"))
    trained = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        for p in trained:
            p.add_(torch.randn_like(p))
    trainer.save_model(str(tmp_path / "checkpoint-5"))
    kept = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in trained:
            p.zero_()
    load_checkpoint(trainer, tmp_path / "checkpoint-5")
    assert all(torch.equal(kept[k], v) for k, v in model.state_dict().items())
