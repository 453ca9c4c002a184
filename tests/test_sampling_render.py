"""One template application, one BOS: rendering for every source family (tokenizers only)."""

from __future__ import annotations

import pytest

from fusechat.sampling.render import is_empty, render_ids, template_messages
from fusechat.testing.tiny import FAMILIES, build_tokenizer

CHAT = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 2 + 2?"}]
USER = CHAT[1:]


@pytest.fixture(scope="module")
def tokenizers():
    return {f: build_tokenizer(f) for f in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_exactly_one_bos(tokenizers, family):
    tok = tokenizers[family]
    ids = render_ids(tok, USER, family)
    if tok.bos_token_id is None:  # Qwen2 has no BOS token: the template's first token opens the prompt
        assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
        assert tok.decode(ids).count("<|im_start|>system") == 1
    else:
        assert ids[0] == tok.bos_token_id
        assert ids.count(tok.bos_token_id) == 1
    assert tok.decode(ids).rstrip().endswith(
        {"llama3": "<|end_header_id|>", "qwen2": "<|im_start|>assistant", "gemma2": "<start_of_turn>model",
         "mistral": "[/INST]"}[family]
    )


@pytest.mark.parametrize("family", ["llama3", "gemma2", "mistral"])
def test_rendering_to_text_then_tokenizing_doubles_bos(tokenizers, family):
    # The ancestor scripts' trap, shown on the same tokenizers: this is what render_ids avoids.
    tok = tokenizers[family]
    text = tok.apply_chat_template(template_messages(CHAT, family), tokenize=False, add_generation_prompt=True)
    assert tok(text)["input_ids"][:2] == [tok.bos_token_id, tok.bos_token_id]


def test_gemma_system_folded_into_first_user_turn(tokenizers):
    tok = tokenizers["gemma2"]
    with pytest.raises(Exception, match="System role not supported"):
        tok.apply_chat_template(CHAT, tokenize=False)
    text = tok.decode(render_ids(tok, CHAT, "gemma2"))
    assert "<start_of_turn>user\nAnswer briefly.\n\nWhat is 2 + 2?<end_of_turn>" in text
    assert template_messages([CHAT[0]], "gemma2") == [{"role": "user", "content": "Answer briefly."}]


def test_empty_prompts():
    assert is_empty([])
    assert is_empty([{"role": "system", "content": "x"}, {"role": "user", "content": "  \n"}])
    assert not is_empty(CHAT)
