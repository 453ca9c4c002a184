"""The training templates against the hub's own chat templates.

The real templates come from the installed TRL's byte-exact copies (`trl/chat_templates/*.jinja`),
read at test time, never from a copy of ours; only Mistral's, which TRL does not ship, is the one
the package carries. Tokenizers carry each family's real special tokens (fusechat.testing.tiny).
For every known template and a suite of conversations, the training template must render exactly
the real template's string and ids, with and without a generation prompt, and mark exactly the
assistant's words plus the turn's end token; the expected mask is found from the real template's
rendering alone, not from the markers under test.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest

from fusechat.templates import (
    DEFAULT_DATE, KNOWN, TemplateError, identify, read, template_kwargs, template_messages,
    training_template, trl_template_dir,
)
from fusechat.testing.tiny import build_tokenizer

TRL_DIR = trl_template_dir()
BY_NAME = {k.name: k for k in KNOWN}

LONG = " ".join(f"Step {i}: the value grows by {i * 3} units, as the table above shows." for i in range(150))
CONVERSATIONS = {
    "one turn": [{"role": "user", "content": "What is the capital of France?"},
                 {"role": "assistant", "content": "The capital of France is Paris."}],
    "several turns": [{"role": "user", "content": "Name a prime number."},
                      {"role": "assistant", "content": "7 is prime."},
                      {"role": "user", "content": "And an even one?"},
                      {"role": "assistant", "content": " 2 is the only even prime. "}],
    "system prompt": [{"role": "system", "content": "You are a terse assistant."},
                      {"role": "user", "content": "Say hi."},
                      {"role": "assistant", "content": "Hi."},
                      {"role": "user", "content": "Again."},
                      {"role": "assistant", "content": "Hi again."}],
    "chinese": [{"role": "user", "content": "请用中文回答：中国的首都是哪里？"},
                {"role": "assistant", "content": "中国的首都是北京。"}],
    "code": [{"role": "user", "content": "Write add(a, b) in Python."},
             {"role": "assistant", "content": "```python\ndef add(a, b):\n    return a + b\n```\n\nassert add(2, 3) == 5"}],
    "empty reply": [{"role": "user", "content": "Say nothing."}, {"role": "assistant", "content": ""}],
    "long reply": [{"role": "user", "content": "Explain at length."}, {"role": "assistant", "content": LONG}],
}

# What precedes an assistant turn's trained text, and that text, in the real template's rendering.
HEADER = {"llama3": "<|start_header_id|>assistant<|end_header_id|>\n\n", "qwen2": "<|im_start|>assistant\n",
          "gemma2": "<start_of_turn>model\n", "mistral": "[/INST]"}


def _body(family: str, content: str, eot: str) -> str:
    if family == "qwen2":
        return content + eot  # Qwen's template keeps the content as it is
    return (" " if family == "mistral" else "") + content.strip() + eot


@pytest.fixture(scope="module")
def tokenizers():
    if TRL_DIR is None or not TRL_DIR.is_dir():
        pytest.fail("TRL's chat templates are not installed; the tests need the real templates")
    out = {}
    for known in KNOWN:
        tok = build_tokenizer(known.family, chat_template=read(known.original))
        out[known.name] = tok
    return out


def test_the_originals_are_the_hub_templates_trl_ships():
    # each known original is read from TRL's folder, except Mistral's, which TRL does not ship
    for known in KNOWN:
        where, name = known.original.split(":")
        assert where == ("fusechat" if known.family == "mistral" else "trl"), known
        if where == "trl":
            assert (TRL_DIR / name).is_file()
            assert read(known.original) == (TRL_DIR / name).read_text(encoding="utf-8")


@pytest.mark.parametrize("name", [k.name for k in KNOWN])
@pytest.mark.parametrize("conv", list(CONVERSATIONS))
def test_training_template_renders_the_real_template_and_marks_the_assistant(tokenizers, name, conv):
    known = BY_NAME[name]
    tok = tokenizers[name]
    real = read(known.original)
    training = training_template(tok, f"tiny-{name}", known.family)
    assert training.known == known
    messages = template_messages(CONVERSATIONS[conv], known.family)
    kw = template_kwargs()

    def render(msgs, template, **extra):
        return tok.apply_chat_template(msgs, chat_template=template, **kw, **extra)

    # the same string and ids, with and without a generation prompt
    for msgs, gen in ((messages, False), (messages[:-1], True)):
        assert render(msgs, training.text, tokenize=False, add_generation_prompt=gen) == render(
            msgs, real, tokenize=False, add_generation_prompt=gen)
        assert render(msgs, training.text, tokenize=True, return_dict=False, add_generation_prompt=gen) == render(
            msgs, real, tokenize=True, return_dict=False, add_generation_prompt=gen)

    # the trained tokens: found in the real template's string, not from the markers
    text = render(messages, real, tokenize=False)
    spans, cursor = [], 0
    for m in messages:
        if m["role"] != "assistant":
            continue
        head, body = HEADER[known.family], _body(known.family, m["content"], known.end_of_turn)
        at = text.find(head + body, cursor)
        assert at >= 0, (head + body)[:80]
        spans.append((at + len(head), at + len(head) + len(body)))
        cursor = spans[-1][1]
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    expected = [any(a < e and b > s for s, e in spans) for a, b in enc["offset_mapping"]]

    out = render(messages, training.text, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert out["input_ids"] == ids
    got = [bool(x) for x in out["assistant_masks"]]
    missing = [j for j, (g, x) in enumerate(zip(got, expected)) if x and not g]
    extra = [j for j, (g, x) in enumerate(zip(got, expected)) if g and not x]
    assert not missing, tok.decode([ids[j] for j in missing])
    if known.training.startswith("fusechat:"):
        assert not extra, tok.decode([ids[j] for j in extra])
    else:
        # TRL's patches (Qwen, Gemma) also mark the newline next to the turn: whitespace, never words
        assert all(tok.decode([ids[j]]).strip() == "" for j in extra), [tok.decode([ids[j]]) for j in extra]
    eot = tok.convert_tokens_to_ids(known.end_of_turn)
    assert sum(1 for i, g in zip(ids, got) if g and i == eot) == len(spans)  # every turn's end is trained


def test_each_template_is_identified_by_its_text_not_by_a_name(tokenizers):
    for known in KNOWN:
        assert identify(read(known.original)) == known
        assert identify(read(known.training)) == known
    llama31 = read(BY_NAME["llama3_1"].original)
    assert identify(llama31.replace("December 2023", "December 2024")) is None  # one character off
    assert identify(None) is None


def test_llama_3_2_prints_the_recipe_date_not_today(tokenizers):
    tok = tokenizers["llama3_2"]
    msgs = CONVERSATIONS["one turn"]
    today = datetime.date.today().strftime("%d %b %Y")
    assert today in tok.apply_chat_template(msgs, tokenize=False)  # the hub template on its own
    fixed = tok.apply_chat_template(msgs, tokenize=False, **template_kwargs())
    assert f"Today Date: {DEFAULT_DATE}\n" in fixed and (today == DEFAULT_DATE or today not in fixed)
    other = tok.apply_chat_template(msgs, tokenize=False, **template_kwargs("01 Jan 2030"))
    assert "Today Date: 01 Jan 2030\n" in other


def test_a_template_with_markers_is_used_as_it_is():
    from fusechat.testing.tiny import CHAT_TEMPLATES

    tok = build_tokenizer("llama3")  # the demo models' templates carry markers
    t = training_template(tok, "tiny", "llama3")
    assert t.text == CHAT_TEMPLATES["llama3"] and "own" in t.source


def test_an_unknown_template_fails_with_the_family_what_was_tried_and_the_fix():
    real = read(BY_NAME["llama3_1"].original)
    tok = build_tokenizer("llama3", chat_template=real.replace("Cutting Knowledge", "Knowledge cut-off"))
    with pytest.raises(TemplateError) as e:
        training_template(tok, "my-org/llama-finetune", "llama3")
    msg = str(e.value)
    for part in ("my-org/llama-finetune", "family llama3", "Tried", "llama3_1", "mistral_v3",
                 "{% generation %}", "assistant_only_loss: false"):
        assert part in msg, part


def test_no_template_at_all_is_an_error():
    tok = build_tokenizer("llama3")
    tok.chat_template = None
    with pytest.raises(TemplateError, match="no chat template"):
        training_template(tok, "bare", "llama3")


def test_sampling_renders_one_bos_on_every_real_template(tokenizers):
    from fusechat.sampling.render import render_ids

    for known in KNOWN:
        tok = tokenizers[known.name]
        for conv in CONVERSATIONS.values():
            ids = render_ids(tok, conv[:-1], known.family, template_kwargs())
            bos = tok.bos_token_id
            if known.family == "qwen2":
                assert bos is None or bos not in ids
            else:
                assert ids[0] == bos and ids.count(bos) == 1, known.name


def test_armorm_finds_its_gating_pattern_with_the_real_llama3_template(tmp_path):
    """ArmoRM-Llama3-8B ships Meta-Llama-3's template; its gating position must be found in every
    conversation it scores, through the scorer's own encoding."""
    from fusechat.scoring.armorm import find_gating_position, gating_pattern_ids
    from fusechat.scoring.reward import RewardScorer
    from fusechat.testing.tiny_armorm import build_tiny_armorm

    path = build_tiny_armorm(tmp_path / "armorm", chat_template=read(BY_NAME["llama3"].original))
    scorer = RewardScorer(str(path), kind="armorm", max_length=4096, device="cpu", dtype="float32")
    pattern = gating_pattern_ids(scorer.tokenizer)
    for conv in CONVERSATIONS.values():
        ids = scorer.encode(conv)
        assert ids.count(scorer.tokenizer.bos_token_id) == 1
        pos = find_gating_position(ids, pattern)
        # the pattern is the last user turn's end and the assistant header, right before the reply
        assert scorer.tokenizer.decode(ids[pos + len(pattern):]).startswith(conv[-1]["content"].strip()[:20])


# -- training on the real templates ------------------------------------------------------------
ROOT = Path(__file__).resolve().parents[1]
PUBLISHED = {  # recipe -> the hub template its target ships
    "llama-3.1-8b": "llama3_1", "llama-3.2-3b": "llama3_2", "llama-3.2-1b": "llama3_2",
    "qwen-2.5-7b": "qwen2_5", "gemma-2-9b": "gemma",
}


def _sft_rows():
    from fusechat.testing.train_data import sft_rows

    rows = sft_rows(14, seed=3)
    for row in rows[:3]:  # a system turn: Gemma-2's template has none and gets it folded in
        row["messages"].insert(0, {"role": "system", "content": "Answer in one sentence."})
    return rows


def _real_model(tmp_path: Path, known) -> Path:
    from fusechat.testing.tiny import build_tiny_lm

    return build_tiny_lm(known.family, tmp_path / f"tiny-{known.name}", chat_template=read(known.original))


@pytest.mark.parametrize("name", [k.name for k in KNOWN])
def test_sft_trains_exactly_the_assistant_turns_on_every_real_template(tmp_path, name):
    """On the trainer's own collated batch (packed, padding-free): one trained span per assistant
    turn, holding its words and ending on the turn's end token."""
    from fusechat.recipe import load_recipe
    from fusechat.testing.train_data import write_recipe, write_split
    from fusechat.train.sft import build_trainer

    known = BY_NAME[name]
    model = _real_model(tmp_path, known)
    run = tmp_path / "run"
    r = load_recipe(write_recipe(tmp_path / "r.yaml", model, known.family, run, sft={"max_length": 512}))
    rows = _sft_rows()
    write_split(rows, run / "datasets" / "sft" / "train.parquet")
    trainer, _, _ = build_trainer(r, run / "models" / r.name / "sft")
    tok = trainer.processing_class
    ds = trainer.train_dataset
    batch = trainer.data_collator([ds[i] for i in range(len(ds))])
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    spans, cur = [], []
    for i, lab in zip(ids, labels):
        if lab != -100:
            cur.append(i)
        elif cur:
            spans.append(cur)
            cur = []
    spans += [cur] if cur else []
    expected = [m["content"] for row in rows for m in row["messages"] if m["role"] == "assistant"]
    assert len(spans) == len(expected)
    eot = tok.convert_tokens_to_ids(known.end_of_turn)
    texts = []
    for span in spans:
        while tok.decode(span[-1:]).strip() == "":  # TRL's Qwen/Gemma patches also train the newline after
            span = span[:-1]
        assert span[-1] == eot, tok.decode(span)
        while tok.decode(span[:1]).strip() == "":  # ... and Qwen's before the reply
            span = span[1:]
        texts.append(tok.decode(span[:-1]).strip())
    assert sorted(texts) == sorted(expected)
    # the BOS of every packed conversation is there once, never twice in a row
    if tok.bos_token_id is not None and known.family != "qwen2":
        assert ids.count(tok.bos_token_id) == len(rows)


@pytest.mark.slow
@pytest.mark.parametrize("recipe_name", list(PUBLISHED))
def test_published_target_runs_sft_then_dpo_on_its_real_template(tmp_path, recipe_name):
    """`fusechat sft` then `fusechat dpo` for each published target: the target's real template, the
    recipe's own training settings (assistant-only loss, packing, the DPO loss and beta), tiny sizes."""
    import json

    from fusechat.recipe import load_recipe
    from fusechat.testing.train_data import dpo_rows, write_recipe, write_split
    from fusechat.train.dpo import run_dpo
    from fusechat.train.sft import run_sft

    published = load_recipe(ROOT / "recipes" / f"{recipe_name}.yaml", check_paths=False)
    known = BY_NAME[PUBLISHED[recipe_name]]
    assert published.target.family == known.family
    model = _real_model(tmp_path, known)
    run = tmp_path / "run"
    sft = {"packing": published.sft.packing, "assistant_only_loss": published.sft.assistant_only_loss,
           "max_length": 256}
    dpo = {"loss_type": published.dpo.loss_type, "beta": published.dpo.beta, "max_length": 256,
           "save_steps": 2, "keep_best_of_last": published.dpo.keep_best_of_last}
    r = load_recipe(write_recipe(tmp_path / "r.yaml", model, known.family, run, sft=sft, dpo=dpo))
    assert r.sft.assistant_only_loss
    assert (r.dpo.loss_type, r.dpo.beta) == (published.dpo.loss_type, published.dpo.beta)
    write_split(_sft_rows(), run / "datasets" / "sft" / "train.parquet")
    write_split(dpo_rows(12, seed=1), run / "datasets" / "dpo" / "train.parquet")
    write_split(dpo_rows(4, seed=2), run / "datasets" / "dpo" / "test.parquet")

    m = run_sft(r)
    assert m.rows_in == m.rows_out == 14
    assert m.extra["chat_template"].startswith(known.training.split(":")[0] + ":")
    sft_dir = run / "models" / r.name / "sft"
    # published with the template its base ships, not the training one
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(sft_dir).chat_template == read(known.original)
    m = run_dpo(r)
    assert m.rows_in == m.rows_out == 12
    metrics = json.loads((run / "models" / r.name / "dpo" / "metrics.json").read_text())
    assert metrics["global_step"] > 0 and "eval_loss" in metrics
