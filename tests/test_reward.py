"""ArmoRM parity with its formula, batching invariance, overlong inputs, checkpoint errors, and
the generic sequence-classification path."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

from fusechat.scoring.armorm import OBJECTIVES, find_gating_position
from fusechat.scoring.reward import RewardScorer, resolve_dtype, token_batches

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "2 + 2 = 4."}],
    [{"role": "user", "content": "Write a haiku about the sea."},
     {"role": "assistant", "content": "Grey waves fold and break\nsalt wind carries gull voices\nthe tide keeps its time"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a prime."},
     {"role": "assistant", "content": "7"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help you today? " * 6}],
    [{"role": "user", "content": "First question"}, {"role": "assistant", "content": "First answer"},
     {"role": "user", "content": "And the second one, please explain at length"},
     {"role": "assistant", "content": "The second answer is longer.\n\nIt has paragraphs."}],
]


def reference_scores(path, conversations):
    """ArmoRM's forward written out from its formula, one unpadded sequence at a time."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, LlamaConfig, LlamaModel

    tok = AutoTokenizer.from_pretrained(path)
    config = LlamaConfig.from_pretrained(path)
    w = load_file(str(path / "model.safetensors"))
    backbone = LlamaModel(config).eval()
    backbone.load_state_dict({k[len("model."):]: v for k, v in w.items() if k.startswith("model.")})
    pattern = [tok.convert_tokens_to_ids(t) for t in ("<|eot_id|>", "<|start_header_id|>")]
    pattern += tok.encode("assistant", add_special_tokens=False)
    pattern += [tok.convert_tokens_to_ids("<|end_header_id|>")] + tok.encode("\n\n", add_special_tokens=False)
    out = []
    for conv in conversations:
        ids = tok.apply_chat_template(conv, tokenize=False)
        ids = tok(ids, add_special_tokens=False)["input_ids"]
        gpos = max(j for j in range(len(ids)) if ids[j : j + len(pattern)] == pattern)
        with torch.no_grad():
            h = backbone(input_ids=torch.tensor([ids])).last_hidden_state[0]
            r = w["regression_layer.weight"] @ h[-1]
            x = h[gpos]
            for i in range(4):
                x = w[f"gating.layers.{i}.weight"] @ x + w[f"gating.layers.{i}.bias"]
                if i < 3:
                    x = torch.clamp(x, min=0)
            g = torch.exp(x / 10) / torch.exp(x / 10).sum() * w["gating.logit_scale"][0]
            t = r @ w["reward_transform_matrix"]
            out.append((float((g * t).sum()), r.tolist()))
    return out


@pytest.fixture(scope="module")
def scorer(tiny_armorm):
    return RewardScorer(str(tiny_armorm), kind="armorm", dtype="float32", device="cpu", batch_tokens=400)


def test_scores_equal_the_formula(tiny_armorm, scorer):
    got = scorer.score(CONVERSATIONS)
    ref = reference_scores(tiny_armorm, CONVERSATIONS)
    for o, (score, rewards) in zip(got, ref):
        assert abs(o.score - score) <= 1e-5
        assert len(o.objectives) == len(OBJECTIVES) == 19
        assert max(abs(a - b) for a, b in zip(o.objectives, rewards)) <= 1e-5
    assert len({round(o.score, 6) for o in got}) == len(got)  # the scores tell texts apart


def test_batched_padded_equals_one_at_a_time(tiny_armorm, scorer):
    lengths = [len(scorer.encode(c)) for c in CONVERSATIONS]
    assert any(len(b) > 1 for b in token_batches(lengths, scorer.batch_tokens))  # really padded
    single = RewardScorer(str(tiny_armorm), dtype="float32", device="cpu", batch_tokens=1)
    for a, b in zip(scorer.score(CONVERSATIONS), single.score(CONVERSATIONS)):
        assert abs(a.score - b.score) <= 1e-5


def test_shared_prompts_equal_one_pass_per_conversation(tiny_armorm):
    """Replies of one prompt continue from its cached pass: the formula's scores, fewer tokens run."""
    prompts = [CONVERSATIONS[0][:1], CONVERSATIONS[2][:2], CONVERSATIONS[4][:3]]  # plain, system, multi-turn
    replies = ["4", "It is four, because two and two make four.", "Four. " * 12, "2 + 2 = 4.\n\nDone."]
    convs = [p + [{"role": "assistant", "content": r}] for p in prompts for r in replies[: 2 + len(p)]]
    convs += [CONVERSATIONS[1], CONVERSATIONS[3]]  # a prompt with one reply: the plain path
    shared = RewardScorer(str(tiny_armorm), dtype="float32", device="cpu", batch_tokens=300)
    ran = []  # real (non-pad) tokens that each backbone pass computes

    def count(module, args, kwargs):
        ran.append(int(kwargs["attention_mask"][:, -kwargs["input_ids"].shape[1]:].sum()))

    hook = shared.model.model.register_forward_pre_hook(count, with_kwargs=True)
    got = shared.score(convs)
    hook.remove()
    for o, (score, rewards) in zip(got, reference_scores(tiny_armorm, convs)):
        assert abs(o.score - score) <= 1e-5
        assert max(abs(a - b) for a, b in zip(o.objectives, rewards)) <= 1e-5
    # each prompt ran once, each reply once, each single conversation whole; in several batches
    encoded = shared.encode_many(convs)
    cuts = [find_gating_position(ids, shared.pattern) + len(shared.pattern) for ids in encoded]
    grouped = range(len(convs) - 2)
    unique_prompts = {tuple(encoded[i][: cuts[i]]) for i in grouped}
    assert len(unique_prompts) == 3
    needed = (sum(map(len, unique_prompts)) + sum(len(encoded[i]) - cuts[i] for i in grouped)
              + len(encoded[-1]) + len(encoded[-2]))
    assert sum(ran) == needed < sum(map(len, encoded)) and len(ran) > 3
    unshared = RewardScorer(str(tiny_armorm), dtype="float32", device="cpu", batch_tokens=300, share_prompts=False)
    for a, b in zip(got, unshared.score(convs)):
        assert abs(a.score - b.score) <= 1e-5


def test_trees_larger_than_the_budget_split_and_keep_the_formula(tiny_armorm):
    """A prompt whose replies exceed the token budget runs in chunks, each with the prompt again:
    still one pass per conversation's scores, and no batch over the budget unless one tree is."""
    prompt = CONVERSATIONS[4][:3]
    replies = ["Four. " * n for n in (1, 3, 9, 14, 2, 6)]
    convs = [prompt + [{"role": "assistant", "content": r}] for r in replies] + [CONVERSATIONS[1]]
    scorer = RewardScorer(str(tiny_armorm), dtype="float32", device="cpu", batch_tokens=200)
    ran = []
    hook = scorer.model.model.register_forward_pre_hook(
        lambda m, a, kw: ran.append(kw["input_ids"].shape[1]), with_kwargs=True)
    got = scorer.score(convs)
    hook.remove()
    for o, (score, rewards) in zip(got, reference_scores(tiny_armorm, convs)):
        assert abs(o.score - score) <= 1e-5
        assert max(abs(a - b) for a, b in zip(o.objectives, rewards)) <= 1e-5
    encoded = scorer.encode_many(convs)
    cut = find_gating_position(encoded[0], scorer.pattern) + len(scorer.pattern)
    tree = cut + sum(len(ids) - cut for ids in encoded[:-1])
    assert tree > 200 and len(ran) > 1 and max(ran) <= 200  # split, and every batch within the budget
    assert tree < sum(ran) < tree + len(encoded[-1]) + (len(ran) - 1) * cut + 1


def test_attention_layouts_keep_the_formula(tiny_armorm, monkeypatch):
    """Both GPU layouts give the formula's scores: SDPA over length buckets padded together (as on
    CUDA), and the varlen kernel's (conversations concatenated without padding, cumulative lengths,
    each packed token's slot). Flash varlen runs on CUDA only: here SDPA per conversation stands in
    for the kernel, so the layout itself is what is tested."""
    import torch.nn.functional as F

    from fusechat.scoring import armorm

    def per_conversation(q, k, v, cu, longest, scaling, groups):
        bounds = cu.tolist()
        assert longest == max(b - a for a, b in zip(bounds, bounds[1:]))
        out = [F.scaled_dot_product_attention(
            q[a:b].transpose(0, 1), k[a:b].transpose(0, 1).repeat_interleave(groups, 0),
            v[a:b].transpose(0, 1).repeat_interleave(groups, 0), is_causal=True, scale=scaling).transpose(0, 1)
            for a, b in zip(bounds, bounds[1:])]
        return torch.cat(out)

    monkeypatch.setattr(armorm, "_varlen", per_conversation)
    prompts = [CONVERSATIONS[0][:1], CONVERSATIONS[4][:3]]
    convs = [p + [{"role": "assistant", "content": r}] for p in prompts for r in ("4", "Four. " * 7, "It is 4.")]
    convs += [CONVERSATIONS[3]]
    reference = reference_scores(tiny_armorm, convs)
    padded = RewardScorer(str(tiny_armorm), dtype="float32", device="cpu", batch_tokens=250)
    padded.bucket_waste = 0.6
    varlen = RewardScorer(str(tiny_armorm), dtype="float32", device="cpu", batch_tokens=250)
    varlen.attention = "varlen"
    for scorer in (padded, varlen):
        for o, (score, rewards) in zip(scorer.score(convs), reference):
            assert abs(o.score - score) <= 1e-5
            assert max(abs(a - b) for a, b in zip(o.objectives, rewards)) <= 1e-5
    from fusechat.scoring.armorm import PackedBatch

    trees = [(list(range(5)), 2, [[7] * 9, [8] * 3, [9] * 8])]
    assert [g.shape for g in PackedBatch.build(trees, "sdpa", 0.0).gather] == [(1, 14), (1, 13), (1, 8)]
    assert [g.shape for g in PackedBatch.build(trees, "sdpa", 0.25).gather] == [(2, 14), (1, 8)]
    with pytest.raises(ValueError, match="varlen attention does not work here: flash attention needs CUDA"):
        RewardScorer(str(tiny_armorm), dtype="float32", device="cpu", attention="varlen")
    assert RewardScorer(str(tiny_armorm), dtype="float32", device="cpu").attention == "sdpa"  # auto on CPU


def test_pack_batches_and_split_tree_respect_the_budget():
    from fusechat.scoring.reward import pack_batches, split_tree

    sizes = [70, 10, 40, 30, 200, 60, 5]
    batches = pack_batches(sizes, 100)
    assert sorted(i for b in batches for i in b) == list(range(len(sizes)))
    assert batches[0] == [4] and all(sum(sizes[i] for i in b) <= 100 for b in batches[1:])
    assert len(batches) == 4  # first fit: 70+30, 60+40, 10+5 together
    chunks = split_tree(20, [50, 10, 30, 40], 100)
    assert sorted(i for c in chunks for i in c) == [0, 1, 2, 3]
    assert all(20 + sum([50, 10, 30, 40][i] for i in c) <= 100 for c in chunks)
    assert split_tree(20, [50, 10], 100) == [[0, 1]]  # one chunk when the whole tree fits


def test_identical_conversations_run_once(tiny_armorm):
    """A repeated answer costs no second pass, and every copy gets the formula's score."""
    convs = [CONVERSATIONS[0], CONVERSATIONS[1], CONVERSATIONS[0], CONVERSATIONS[3], CONVERSATIONS[1], CONVERSATIONS[0]]
    scorer = RewardScorer(str(tiny_armorm), dtype="float32", device="cpu", share_prompts=False)
    ran, done = [], []
    hook = scorer.model.model.register_forward_pre_hook(
        lambda m, a, kw: ran.append(int(kw["attention_mask"].sum())), with_kwargs=True)
    got = scorer.score(convs, progress=done.append)
    hook.remove()
    unique = {tuple(ids) for ids in scorer.encode_many(convs)}
    assert len(unique) == 3 and sum(ran) == sum(map(len, unique))
    assert sum(done) == len(convs)
    for o, (score, rewards) in zip(got, reference_scores(tiny_armorm, convs)):
        assert abs(o.score - score) <= 1e-5
        assert max(abs(a - b) for a, b in zip(o.objectives, rewards)) <= 1e-5
    got[0].objectives[0] = 99.0  # copies are separate lists: a caller editing one leaves the others
    assert got[2].objectives[0] != 99.0


def test_one_bos_and_the_gating_position(scorer):
    ids = scorer.encode(CONVERSATIONS[4])
    assert ids.count(scorer.tokenizer.bos_token_id) == 1 and ids[0] == scorer.tokenizer.bos_token_id
    gpos = find_gating_position(ids, scorer.pattern)
    # the last user turn ends there: what follows is the final assistant reply only
    tail = scorer.tokenizer.decode(ids[gpos:])
    assert tail.startswith("<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nThe second answer")
    with pytest.raises(ValueError, match="gating token pattern"):
        find_gating_position(scorer.encode(CONVERSATIONS[0][:1]), scorer.pattern)  # no assistant turn


def test_overlong_inputs_truncated_or_skipped(tiny_armorm, scorer):
    long = [{"role": "user", "content": "Tell me a story"}, {"role": "assistant", "content": "once upon a time " * 80}]
    n = len(scorer.encode(long))
    cut = RewardScorer(str(tiny_armorm), dtype="float32", device="cpu", max_length=n - 20)
    skip = RewardScorer(str(tiny_armorm), dtype="float32", device="cpu", max_length=n - 20, overlong="skip")
    tiny = RewardScorer(str(tiny_armorm), dtype="float32", device="cpu", max_length=20)
    (a,), (b,), (c,) = cut.score([long]), skip.score([long]), tiny.score([long])
    assert a.truncated and a.score is not None
    # what was scored: the head of the conversation plus its final <|eot_id|>
    ids = scorer.encode(long)
    assert ids[-1] == scorer.tokenizer.convert_tokens_to_ids("<|eot_id|>")
    head = ids[: n - 21] + ids[-1:]
    (expected,), _ = scorer._forward([(head, find_gating_position(head, scorer.pattern), True)])
    assert abs(a.score - expected) <= 1e-5
    assert b.score is None and not b.truncated and f"{n} tokens > max_length {n - 20}" in b.detail
    assert c.score is None and "prompt alone exceeds" in c.detail


def _mismatched_keys(bad):
    from safetensors.torch import load_file, save_file

    w = load_file(str(bad / "model.safetensors"))
    del w["gating.logit_scale"]
    w["score.weight"] = torch.zeros(1, 4)
    save_file(w, str(bad / "model.safetensors"))
    return "model.safetensors", r"missing key\(s\) \['gating.logit_scale'\].*unexpected key\(s\) \['score.weight'\]"


def _truncated(bad):
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # an interrupted download
    return "model.safetensors", "not a complete safetensors file"


def _shard_missing(bad):
    (bad / "model.safetensors").rename(bad / "model-00001-of-00002.safetensors")
    (bad / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    return "model.safetensors.index.json", "lists model-00002-of-00002.safetensors, which is not in the folder"


def _no_config(bad):
    (bad / "config.json").unlink()
    return "config.json", "missing"


def _other_architecture(bad):
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "architectures": ["LlamaForCausalLM"]}))
    return "config.json", "architectures \\['LlamaForCausalLM'\\], expected 'LlamaForRewardModelWithGating'"


@pytest.mark.parametrize("breaks", [_mismatched_keys, _truncated, _shard_missing, _no_config, _other_architecture])
def test_a_bad_checkpoint_is_an_input_error_naming_its_file(tiny_armorm, tmp_path, breaks):
    from fusechat.errors import InputError
    from fusechat.scoring.armorm import load_armorm

    bad = tmp_path / "bad"
    shutil.copytree(tiny_armorm, bad)
    name, why = breaks(bad)
    with pytest.raises(InputError, match=f"^{re.escape(str(bad / name))}: .*{why}") as e:
        load_armorm(bad)
    assert "\n" not in str(e.value)


def test_a_folder_without_a_tokenizer_is_an_input_error(tmp_path):
    from fusechat.errors import InputError

    with pytest.raises(InputError, match=f"^{re.escape(str(tmp_path))}: no tokenizer can be loaded"):
        RewardScorer(str(tmp_path), device="cpu")


def test_dtype_auto():
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("auto", "cuda:1") == torch.bfloat16
    assert resolve_dtype("float16", "cpu") == torch.float16


def test_token_batches_respect_the_budget():
    lengths = [5, 50, 7, 30, 30, 200, 1]
    batches = token_batches(lengths, 100)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 100
    assert batches[0] == [5]  # the longest alone, first


def test_sequence_classification_reward_model(tmp_path):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from fusechat.testing.tiny import build_tokenizer

    tok = build_tokenizer("llama3")  # no pad token: batches pad with <|eot_id|>
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, num_labels=1, initializer_range=0.1,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    rm = RewardScorer(str(tmp_path / "rm"), kind="sequence_classification", dtype="float32", device="cpu",
                      batch_tokens=10_000)
    batched = rm.score(CONVERSATIONS)
    model = LlamaForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    for conv, out in zip(CONVERSATIONS, batched):
        ids = tok(tok.apply_chat_template(conv, tokenize=False), add_special_tokens=False)["input_ids"]
        assert ids.count(tok.bos_token_id) == 1
        with torch.no_grad():
            expected = model(input_ids=torch.tensor([ids])).logits[0, 0].item()
        assert abs(out.score - expected) <= 1e-5 and out.objectives is None


def test_gpu_score_check_runs_tiny_on_cpu(tmp_path):
    """The GPU check's CPU mode: every variant measured, the table last, the JSON written; and
    nothing on its import path that the GPU machine lacks (vLLM, TRL, datasets, pyarrow)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "gpu_score_check.py"
    proc = subprocess.run([sys.executable, "-X", "importtime", str(script), "--size", "tiny"],
                          env={**os.environ, "OUT": str(tmp_path)}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0]
                for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert {"torch", "transformers", "fusechat"} <= imported
    assert not imported & {"vllm", "trl", "datasets", "pyarrow"}
    assert proc.stdout.rstrip().splitlines()[-1].startswith("| tiny | shared, varlen | not run: not available")

    data = json.loads((tmp_path / "gpu_score_check.json").read_text())
    (size,) = data["sizes"]
    rows = {r["variant"]: r for r in data["results"]}
    loop, unshared, shared = rows["loop"], rows["unshared"], rows["shared"]
    assert loop["conversations"] == size["sample"] < shared["conversations"] == size["conversations"] == 60
    for r in (loop, unshared, shared, rows["shared, 1024 tokens"]):
        assert r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 and r["peak_gib"] > 0
        # bf16 against the same weights in fp32: within a small part of the scores' spread
        assert r["max_diff_fp32"] < 0.25 * size["fp32_score_std"]
    assert loop["computed_tokens"] == loop["tokens"]
    assert unshared["computed_tokens"] == unshared["tokens"]  # packed: no padding computed
    # shared: each prompt once per chunk (a 1,024-token budget splits trees, so more prompts run again)
    assert shared["computed_tokens"] < rows["shared, 1024 tokens"]["computed_tokens"] < unshared["tokens"]
    assert size["max_diff_shared_unshared"] < 0.25 * size["fp32_score_std"]
