"""The tiny source-family models load and behave like the real checkpoints in transformers and vLLM."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import jinja2
import pytest

from fusechat.testing.tiny import FAMILIES, SPECIAL_TOKENS, build_tiny_lm, build_tokenizer, tiny_models

ARCHITECTURES = {
    "llama3": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "mistral": "MistralForCausalLM",
}

TEXTS = [
    "Hello, world! How are you today?",
    "Solve $x^2 - 5x + 6 = 0$. The roots are $2$ and $3$, so \\boxed{5} is their sum.",
    "def square(x):\n    return x * x\n\n\nassert square(3) == 9\n",
    "请用中文回答：人工智能是什么？",
    "Mixed:\tTabs,  double  spaces,\r\nCRLF, émojis 😀, and rare bytes \x00\x7f ÿ.",
    # Decomposed "é" (e + combining acute): Qwen2's NFC normalizer must apply before and after a reload.
    "Cafe\u0301 cre\u0300me",
]

CONVERSATION = [
    {"role": "user", "content": "What is 12 * 7? Answer with \\boxed{}."},
    {"role": "assistant", "content": "12 * 7 = 84, so the answer is \\boxed{84}."},
    {"role": "user", "content": "Now write a Python function that adds two numbers. 谢谢！"},
    {"role": "assistant", "content": "def add(a, b):\n    return a + b\n"},
]


def _assistant_span(family: str, content: str) -> str:
    """The text each family's template trains on for one assistant message."""
    eot = SPECIAL_TOKENS[family]["end_of_turn"]
    if family == "qwen2":
        return content + eot
    if family == "mistral":
        return " " + content.strip() + eot
    return content.strip() + eot


# Exact renderings of [user "Hi", assistant "Hello!", user "Bye"] + generation prompt, as the real
# templates produce them.
EXPECTED_RENDERING = {
    "llama3": (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    "qwen2": (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n"
    ),
    "gemma2": (
        "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n"
    ),
    "mistral": "<s>[INST] Hi[/INST] Hello!</s>[INST] Bye[/INST]",
}

SHORT_CHAT = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Bye"},
]


def _load(path: Path, **model_kwargs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, **model_kwargs)
    return tok, model.eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_loads_offline_and_samples_new_tokens(tiny_models, family):
    import torch

    tok, model = _load(tiny_models[family])
    assert type(model).__name__ == ARCHITECTURES[family]
    assert model.dtype == torch.float32
    assert model.config.hidden_size // model.config.num_attention_heads >= 32  # vLLM CPU minimum
    inputs = tok.apply_chat_template(
        [{"role": "user", "content": "Tell me a story."}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True,
    )
    torch.manual_seed(0)
    out = model.generate(**inputs, do_sample=True, max_new_tokens=8, min_new_tokens=8)
    new = out[0, inputs["input_ids"].shape[1]:].tolist()
    assert len(new) == 8
    assert len(set(new)) > 1, f"sampling produced one repeated token: {new}"
    assert all(0 <= t < len(tok) for t in new)


@pytest.mark.parametrize("family", FAMILIES)
def test_tokenizer_save_load_round_trip(tiny_models, family, tmp_path):
    from transformers import AutoTokenizer

    built = build_tokenizer(family)
    loaded = AutoTokenizer.from_pretrained(tiny_models[family], local_files_only=True)
    if family == "qwen2":
        # transformers rebuilds this class's normalizer and pre-tokenizer on load: the trap under test.
        assert type(loaded).__name__ == "Qwen2Tokenizer"
    # Save the loaded one again, next to the model config so the same class is chosen on reload.
    loaded.save_pretrained(tmp_path)
    shutil.copy(tiny_models[family] / "config.json", tmp_path / "config.json")
    reloaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    for text in TEXTS:
        ids = built(text).input_ids
        assert loaded(text).input_ids == ids, (family, text)
        assert reloaded(text).input_ids == ids, (family, text)
        decoded = loaded.decode(ids, skip_special_tokens=True)
        expected = text
        if family == "qwen2":
            import unicodedata

            expected = unicodedata.normalize("NFC", text)
        assert decoded == expected
    for t in (built, loaded, reloaded):
        assert (t.bos_token, t.eos_token, t.pad_token) == tuple(
            SPECIAL_TOKENS[family][k] for k in ("bos_token", "eos_token", "pad_token")
        )
        assert t.chat_template == built.chat_template
    assert len(built) == len(loaded) == len(reloaded)
    assert 900 <= len(built) <= 1100


@pytest.mark.parametrize("family", FAMILIES)
def test_bos_eos_pad_like_the_real_tokenizers(family):
    tok = build_tokenizer(family)
    spec = SPECIAL_TOKENS[family]
    plain = tok("Hello there").input_ids
    rendered = tok.apply_chat_template(SHORT_CHAT, tokenize=False, add_generation_prompt=True)
    chat_ids = tok.apply_chat_template(SHORT_CHAT, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert tok(rendered, add_special_tokens=False).input_ids == chat_ids
    if spec["add_bos"]:
        bos = tok.convert_tokens_to_ids(spec["bos_token"])
        assert plain[0] == bos and plain.count(bos) == 1
        assert chat_ids[0] == bos and chat_ids.count(bos) == 1
        # Tokenizing a rendered chat string again adds a second BOS, as with the real tokenizers.
        assert tok(rendered).input_ids[:2] == [bos, bos]
    else:
        assert tok.bos_token is None
        assert tok(rendered).input_ids == chat_ids
    for name in ("eos_token", "pad_token"):
        token = spec[name]
        assert getattr(tok, name) == token
        if token is not None:
            assert tok(token, add_special_tokens=False).input_ids == [tok.convert_tokens_to_ids(token)]


@pytest.mark.parametrize("family", FAMILIES)
def test_chat_template_renders_the_real_format(family):
    tok = build_tokenizer(family)
    assert tok.apply_chat_template(SHORT_CHAT, tokenize=False, add_generation_prompt=True) == (
        EXPECTED_RENDERING[family]
    )
    with_system = [{"role": "system", "content": "Be brief."}] + SHORT_CHAT
    if family == "gemma2":
        with pytest.raises(jinja2.TemplateError, match="System role not supported"):
            tok.apply_chat_template(with_system, tokenize=False)
    else:
        rendered = tok.apply_chat_template(with_system, tokenize=False)
        assert rendered.count("Be brief.") == 1
        if family == "qwen2":
            assert "You are Qwen" not in rendered
        if family == "mistral":
            # Mistral folds the system text into the last user turn.
            assert rendered.endswith("[INST] Be brief.\n\nBye[/INST]")


@pytest.mark.parametrize("family", FAMILIES)
def test_assistant_mask_covers_exactly_the_assistant_turns(family):
    tok = build_tokenizer(family)
    out = tok.apply_chat_template(CONVERSATION, return_assistant_tokens_mask=True, return_dict=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert len(ids) == len(mask)
    runs, current = [], []
    for token, m in zip(ids, mask):
        if m:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    expected = [_assistant_span(family, m["content"]) for m in CONVERSATION if m["role"] == "assistant"]
    assert [tok.decode(run) for run in runs] == expected


def test_trl_assistant_only_loss_trains_on_assistant_turns_only(tiny_models, tmp_path):
    import math

    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    for family in FAMILIES:
        tok, model = _load(tiny_models[family])
        args = SFTConfig(
            output_dir=str(tmp_path / family), use_cpu=True, bf16=False, gradient_checkpointing=False,
            assistant_only_loss=True, max_steps=1, per_device_train_batch_size=2, report_to=[],
            save_strategy="no", disable_tqdm=True,
        )
        data = Dataset.from_list([{"messages": CONVERSATION}] * 2)
        trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok)
        labels = [t for t in trainer.train_dataset[0]["labels"] if t != -100]
        expected = "".join(_assistant_span(family, m["content"]) for m in CONVERSATION if m["role"] == "assistant")
        assert tok.decode(labels) == expected, family
        assert math.isfinite(trainer.train().training_loss)


@pytest.mark.parametrize("family", FAMILIES)
def test_generation_config_stops_at_end_of_turn(tiny_models, family):
    from transformers import AutoConfig, GenerationConfig

    path = tiny_models[family]
    tok = build_tokenizer(family)
    gen = GenerationConfig.from_pretrained(path, local_files_only=True)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    assert tok.convert_tokens_to_ids(SPECIAL_TOKENS[family]["end_of_turn"]) in eos
    assert sorted(eos) == sorted(tok.convert_tokens_to_ids(SPECIAL_TOKENS[family]["stop_tokens"]))
    assert gen.bos_token_id == tok.bos_token_id == config.bos_token_id
    assert config.vocab_size == len(tok)
    if family == "gemma2":
        assert config.sliding_window == 32 and config.final_logit_softcapping == 30.0
        assert config.attn_logit_softcapping == 50.0


def _weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")


def test_builds_are_fast_deterministic_and_reused(tmp_path):
    import torch

    start = time.perf_counter()
    first = tiny_models(tmp_path / "a")
    elapsed = time.perf_counter() - start
    print(f"built all four tiny models in {elapsed:.2f} s")
    assert elapsed < 60
    second = tiny_models(tmp_path / "b")
    for family in FAMILIES:
        a, b = _weights(first[family]), _weights(second[family])
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) and a[k].dtype == torch.float32 for k in a), family
        assert (first[family] / "tokenizer.json").read_bytes() == (second[family] / "tokenizer.json").read_bytes()

    # Same parameters: reused without rewriting; another seed: rebuilt with different weights.
    weights_file = first["llama3"] / "model.safetensors"
    stamp = weights_file.stat().st_mtime_ns
    assert build_tiny_lm("llama3", first["llama3"]) == first["llama3"]
    assert weights_file.stat().st_mtime_ns == stamp
    build_tiny_lm("llama3", first["llama3"], seed=1)
    reseeded = _weights(first["llama3"])
    original = _weights(second["llama3"])
    assert not torch.equal(reseeded["model.embed_tokens.weight"], original["model.embed_tokens.weight"])
    assert json.loads((first["llama3"] / "tiny-build.json").read_text())["seed"] == 1


def test_build_refuses_bad_parameters_and_foreign_folders(tmp_path):
    with pytest.raises(ValueError, match="unknown model family 'phi3'"):
        build_tiny_lm("phi3", tmp_path / "x")
    with pytest.raises(ValueError, match="head size"):
        build_tiny_lm("llama3", tmp_path / "x", hidden_size=96, num_heads=4)  # head size 24
    with pytest.raises(ValueError, match="num_kv_heads"):
        build_tiny_lm("llama3", tmp_path / "x", num_heads=4, num_kv_heads=3)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="foreign"):
        build_tiny_lm("qwen2", foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"


# One engine per process: vLLM keeps an engine's memory until its process exits, and the engine
# core is spawned, hence the __main__ guard.
VLLM_PROBE = r'''
import json, sys, time

def main(model, prompt_ids_file, out_file):
    start = time.perf_counter()
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    import_s = time.perf_counter() - start
    ids = json.loads(open(prompt_ids_file).read())
    start = time.perf_counter()
    llm = LLM(model=model, dtype="float32", enforce_eager=True, seed=0, max_model_len=512,
              distributed_executor_backend="uni")
    start_s = time.perf_counter() - start
    scored = llm.generate(TokensPrompt(prompt_token_ids=ids),
                          SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    prompt_logprobs = [None if d is None else d[t].logprob for d, t in zip(scored.prompt_logprobs, ids)]
    sampled = llm.generate(TokensPrompt(prompt_token_ids=ids),
                           SamplingParams(temperature=1.0, max_tokens=8, min_tokens=8), use_tqdm=False)[0]
    with open(out_file, "w") as f:
        json.dump({"import_s": import_s, "start_s": start_s, "prompt_logprobs": prompt_logprobs,
                   "generated": list(sampled.outputs[0].token_ids)}, f)

if __name__ == "__main__":
    main(*sys.argv[1:])
'''


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_vllm_generates_and_matches_transformers_log_probs(tiny_models, family, tmp_path):
    import torch

    # transformers' default SDPA attention skips Gemma-2's attention-logit soft-capping (log-probs then
    # differ by ~6e-3); eager attention implements the real model, as vLLM does.
    tok, model = _load(tiny_models[family], attn_implementation="eager")
    # Longer than Gemma-2's 32-token sliding window, so the windowed layers are compared too.
    ids = tok.apply_chat_template(CONVERSATION[:3], add_generation_prompt=True, return_dict=True)["input_ids"]
    assert len(ids) > 64
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    expected = torch.log_softmax(logits[:-1], dim=-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]

    (tmp_path / "probe.py").write_text(VLLM_PROBE)
    (tmp_path / "ids.json").write_text(json.dumps(ids))
    env = dict(os.environ)
    # The engine core runs inside the probe process: same model code, one interpreter start instead
    # of three (about 20 s instead of 60-80 s per family on two loaded cores).
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    # VLLM_CPU_OMP_THREADS_BIND stays at its default ("auto": compute on one core, one reserved), which
    # leaves a core to the other test processes sharing the machine.
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(tmp_path / "probe.py"), str(tiny_models[family]), str(tmp_path / "ids.json"),
         str(tmp_path / "out.json")],
        env=env, capture_output=True, text=True, timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((tmp_path / "out.json").read_text())
    print(f"{family}: vllm import {result['import_s']:.1f} s, engine start {result['start_s']:.1f} s, "
          f"process total {time.perf_counter() - started:.1f} s")

    assert result["prompt_logprobs"][0] is None
    got = torch.tensor(result["prompt_logprobs"][1:])
    assert got.shape == expected.shape
    max_diff = (got - expected).abs().max().item()
    assert max_diff < 1e-4, f"{family}: vLLM and transformers prompt log-probs differ by {max_diff}"
    # A random model's distribution is not flat: the comparison above is not of near-constants.
    assert expected.std().item() > 0.1

    generated = result["generated"]
    assert len(generated) == 8
    assert all(0 <= t < len(tok) for t in generated)
