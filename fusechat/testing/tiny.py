"""Tiny source-family models: random weights, real tokenizer conventions.

Each family gets a byte-level BPE tokenizer trained here on a small embedded corpus, carrying the real
model's special tokens, BOS/EOS/PAD behaviour and chat template (plus `{% generation %}` markers, so
assistant-only losses work), and a ~0.4M-parameter causal LM of the real architecture. The folders load
offline through `AutoTokenizer` / `AutoModelForCausalLM` and in vLLM exactly like hub checkpoints, so
tests exercise the same code paths as the real sources (including traps such as a second BOS when a
rendered chat string is tokenized again).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fusechat.run import atomic_dir

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

FAMILIES = ("llama3", "qwen2", "gemma2", "mistral")

VOCAB_SIZE = 1000
# Real checkpoints allow 8k-128k positions; 8k keeps vLLM's rope caches and max_model_len small.
MAX_POSITIONS = 8192
_MARKER = "tiny-build.json"

# Llama-3's pre-tokenizer split (tokenizer.json of meta-llama/Llama-3.1-*).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Chat templates: the real templates' text for plain chats (tool-calling branches left out), with
# `{% generation %}` around each assistant message's content and its end-of-turn token.
CHAT_TEMPLATES: dict[str, str] = {
    # meta-llama/Llama-3.1-*-Instruct: always a system header with the knowledge/today dates.
    "llama3": r"""{{- bos_token }}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {%- if message['role'] == 'assistant' %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
        {%- generation %}
            {{- message['content'] | trim + '<|eot_id|>' }}
        {%- endgeneration %}
    {%- else %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
""",
    # Qwen/Qwen2.5-*-Instruct: ChatML with Qwen's default system prompt.
    "qwen2": r"""{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
{%- else %}
    {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == "assistant" %}
        {{- '<|im_start|>' + message.role + '\n' }}
        {%- generation %}
            {{- message.content + '<|im_end|>' }}
        {%- endgeneration %}
        {{- '\n' }}
    {%- elif (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif not (message.role == "system" and loop.first) %}
        {{- raise_exception('Unsupported role: ' + message.role) }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
""",
    # google/gemma-2-*-it: no system role, strictly alternating turns, assistant is "model".
    "gemma2": r"""{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if (message['role'] == 'assistant') %}{{ '<start_of_turn>model\n' }}{% generation %}{{ message['content'] | trim + '<end_of_turn>' }}{% endgeneration %}{{ '\n' }}{% else %}{{ '<start_of_turn>' + message['role'] + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}""",
    # mistralai/Mistral-Large-Instruct-2407: system text goes into the last user turn.
    "mistral": r"""{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message["role"] == "user" %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST] " + system_message + "\n\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST] " + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif message["role"] == "assistant" %}
        {%- generation %}
            {{- " " + message["content"]|trim + eos_token }}
        {%- endgeneration %}
    {%- else %}
        {{- raise_exception("Only user and assistant roles are supported, with the exception of an initial optional system message!") }}
    {%- endif %}
{%- endfor %}
""",
}

# Per family: special tokens that take the first ids (as in the real vocabularies of Gemma and Mistral),
# those appended after the learned vocabulary (Llama-3, Qwen2), the roles, and the end-of-turn token.
SPECIAL_TOKENS: dict[str, dict[str, Any]] = {
    "llama3": {
        "leading": [],
        "trailing": [
            "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
            "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
            "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
        ],
        "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "pad_token": None, "unk_token": None,
        "add_bos": True, "end_of_turn": "<|eot_id|>",
        "stop_tokens": ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"],
    },
    "qwen2": {
        "leading": [],
        "trailing": [
            "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
            "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
            "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
        ],
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None,
        "add_bos": False, "end_of_turn": "<|im_end|>",
        "stop_tokens": ["<|im_end|>", "<|endoftext|>"],
    },
    "gemma2": {
        "leading": ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"],
        "trailing": [],
        "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
        "add_bos": True, "end_of_turn": "<end_of_turn>",
        "stop_tokens": ["<eos>", "<end_of_turn>"],
    },
    "mistral": {
        "leading": [
            "<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]",
            "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]",
        ],
        "trailing": [],
        "bos_token": "<s>", "eos_token": "</s>", "pad_token": None, "unk_token": "<unk>",
        "add_bos": True, "end_of_turn": "</s>",
        "stop_tokens": ["</s>"],
    },
}

# Sampling defaults shipped in the real generation_config.json files.
_GENERATION_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama3": {"do_sample": True, "temperature": 0.6, "top_p": 0.9},
    "qwen2": {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05},
    "gemma2": {"cache_implementation": "hybrid"},
    "mistral": {},
}

# Training text for the tokenizers: enough variety that every domain the pipeline handles (chat,
# numbers, LaTeX answers, Python, Chinese) gets real merges instead of raw bytes.
_CORPUS = r"""
The quick brown fox jumps over the lazy dog. A helpful answer is clear, correct and short.
Please explain the difference between a list and a tuple in Python, and give an example.
Sure! Here is a step-by-step explanation of how the algorithm works, with an example.
Write a short poem about the ocean at night. The moon was bright and the waves were calm.
Summarize the following article in three sentences. The report describes the results of the study.
What is the capital of France? The capital of France is Paris. What about Japan? It is Tokyo.
I'm sorry, but I can't help with that. Let me know if you have any other questions!
Thank you for your question. Here are some tips: 1. Sleep well. 2. Eat vegetables. 3. Exercise daily.
You are a helpful assistant. The user asked about the weather; it will be sunny tomorrow in London.
Translate "good morning" into Spanish, French and German: buenos días, bonjour, guten Morgen.
She said, "It's not what you think." They're going home; we'll see them later. He'd already left.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 25 30 42 50 64 99 100 128 256 512 1000
2024 2025 3.14159 2.71828 1,000,000 -7 +3 0.5 1/2 3/4 12:30 50% $19.99 #1 x^2 y_1 a*b a+b=c
Solve for x: 2x + 3 = 11. Subtract 3 from both sides: 2x = 8. Divide by 2: x = 4. The answer is \boxed{4}.
Compute \frac{1}{2} + \frac{1}{3} = \frac{5}{6}. Therefore the final answer is \boxed{\frac{5}{6}}.
Let $f(x) = x^2 - 4x + 4$. Then $f(x) = (x - 2)^2$, so the minimum value is $0$ at $x = 2$.
The area of a circle with radius $r$ is $\pi r^2$; with $r = 3$ it is $9\pi$, so \boxed{9\pi}.
If $a + b = 10$ and $a - b = 2$, then $a = 6$ and $b = 4$, and $ab = 24$. \boxed{24}
\sqrt{16} = 4, \sum_{i=1}^{n} i = \frac{n(n+1)}{2}, \int_0^1 x \, dx = \frac{1}{2}, \left( \right) \cdot \times \leq \geq
The probability of rolling two sixes is $\frac{1}{36}$. The expected value is $3.5$.
```python
def add(a: int, b: int) -> int:
    \"\"\"Return the sum of a and b.\"\"\"
    return a + b


def fibonacci(n):
    if n < 2:
        return n
    return fibonacci(n - 1) + fibonacci(n - 2)


class Stack:
    def __init__(self):
        self.items = []

    def push(self, item):
        self.items.append(item)

    def pop(self):
        if not self.items:
            raise IndexError("pop from empty stack")
        return self.items.pop()


for i in range(10):
    print(f"{i}: {i * i}")

import math
from collections import defaultdict
result = [x for x in data if x % 2 == 0]
counts = defaultdict(int)
with open("file.txt", "r", encoding="utf-8") as f:
    lines = f.read().splitlines()
assert add(2, 3) == 5
assert fibonacci(10) == 55
try:
    value = int(text)
except ValueError:
    value = None
while left <= right:
    mid = (left + right) // 2
    return True if nums[mid] == target else False
```
def two_sum(nums, target): seen = {}; return [seen[target - n], i] lambda x: x + 1 None True False
请用中文回答这个问题。人工智能是计算机科学的一个分支，它研究如何让机器像人一样思考和学习。
你好！我是一个乐于助人的助手。今天天气很好，我们去公园散步吧。
数学题：小明有5个苹果，给了小红2个，还剩下3个。答案是3。
请写一首关于春天的诗。春风吹绿了大地，花儿开满了山坡。
中国的首都是北京。上海是一个国际大都市。学习编程需要耐心和练习。
谢谢你的帮助！不客气，有问题随时问我。这个问题的答案是：第一，第二，第三。
Emojis and symbols: 😀 ✓ → ← ≠ ≈ ∞ ° € £ ¥ © ® ™ … « » — – • ¿ ¡ é è ê à ç ñ ö ü ß
"""


def _split_pattern(family: str) -> str:
    if family == "qwen2":
        # The exact regex transformers' Qwen2Tokenizer installs on load, so a saved tokenizer
        # encodes the same after `from_pretrained`.
        from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

        return PRETOKENIZE_REGEX
    return _LLAMA3_SPLIT


def _check_family(family: str) -> dict[str, Any]:
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; expected one of {', '.join(FAMILIES)}")
    return SPECIAL_TOKENS[family]


def build_tokenizer(family: str, chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """A deterministic byte-level BPE tokenizer (~1000 tokens) with the family's real conventions.

    `chat_template` replaces the family's template here (tests pass the hub's own, as TRL ships
    it, which has no generation markers)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from tokenizers import processors, trainers
    from transformers import PreTrainedTokenizerFast

    spec = _check_family(family)
    tok = Tokenizer(models.BPE())
    if family == "qwen2":
        tok.normalizer = normalizers.NFC()
    if family in ("llama3", "qwen2"):
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_split_pattern(family)), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    else:
        # Gemma and Mistral use SentencePiece; a GPT-2 byte-level split gives the same "any text
        # encodes" guarantee with one tokenizer model for all families.
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - len(spec["trailing"]),
        min_frequency=1,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in spec["leading"]],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.strip().splitlines(), trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in spec["trailing"]])
    if spec["add_bos"]:
        bos = spec["bos_token"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=spec["bos_token"],
        eos_token=spec["eos_token"],
        pad_token=spec["pad_token"],
        unk_token=spec["unk_token"],
        chat_template=chat_template or CHAT_TEMPLATES[family],
        model_max_length=MAX_POSITIONS,
        # Llama-3.1's config asks for clean-up, but transformers 5 ignores it for BPE (with a warning).
        clean_up_tokenization_spaces=False,
    )


# Head sizes vLLM's CPU attention backend accepts (vllm.v1.attention.backends.cpu_attn); kept here so
# a bad size fails at build time, not minutes later inside an engine start, without importing vLLM.
_VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def _model_config(family: str, tok: PreTrainedTokenizerFast, params: dict[str, Any]):
    from transformers import Gemma2Config, LlamaConfig, MistralConfig, Qwen2Config

    spec = SPECIAL_TOKENS[family]
    stop_ids = [tok.convert_tokens_to_ids(t) for t in spec["stop_tokens"]]
    common = dict(
        vocab_size=len(tok),
        hidden_size=params["hidden_size"],
        intermediate_size=2 * params["hidden_size"],
        num_hidden_layers=params["num_layers"],
        num_attention_heads=params["num_heads"],
        num_key_value_heads=params["num_kv_heads"],
        max_position_embeddings=MAX_POSITIONS,
        # Wider than the usual 0.02 so next-token distributions are peaked enough for log-prob
        # comparisons between engines to mean something.
        initializer_range=0.1,
        bos_token_id=tok.bos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    head_dim = params["hidden_size"] // params["num_heads"]
    if family == "llama3":
        return LlamaConfig(
            **common, eos_token_id=stop_ids, tie_word_embeddings=False, rms_norm_eps=1e-5,
            rope_parameters={
                "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                # Same 8x extension as Llama-3.1 (8k -> 128k), scaled down to MAX_POSITIONS.
                "original_max_position_embeddings": MAX_POSITIONS // 8,
            },
        )
    if family == "qwen2":
        return Qwen2Config(
            **common, eos_token_id=tok.eos_token_id, tie_word_embeddings=False, rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, use_sliding_window=False,
        )
    if family == "gemma2":
        # A window of 32 tokens (real: 4096) so short test prompts already cross it on the sliding layers.
        return Gemma2Config(
            **common, eos_token_id=stop_ids, head_dim=head_dim, query_pre_attn_scalar=head_dim,
            sliding_window=32, final_logit_softcapping=30.0, attn_logit_softcapping=50.0,
            hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        )
    return MistralConfig(
        **common, eos_token_id=tok.eos_token_id, head_dim=head_dim, sliding_window=None,
        tie_word_embeddings=False, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    )


def _builder_hash() -> str:
    # Any change to this module (corpus, templates, configs) invalidates earlier builds.
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


def build_tiny_lm(
    family: str,
    out_dir: Path | str,
    *,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    seed: int = 0,
    chat_template: str | None = None,
) -> Path:
    """Write a seeded random causal LM of `family` with its tokenizer and generation config to `out_dir`.

    Returns `out_dir`. A folder already holding a build with the same parameters is reused as is.
    `chat_template` replaces the family's template (see `build_tokenizer`).
    """
    _check_family(family)
    out_dir = Path(out_dir)
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError(
            f"hidden_size ({hidden_size}) must divide by num_heads ({num_heads}), "
            f"and num_heads by num_kv_heads ({num_kv_heads})"
        )
    head_dim = hidden_size // num_heads
    if head_dim not in _VLLM_CPU_HEAD_SIZES:
        raise ValueError(
            f"head size hidden_size/num_heads = {head_dim} is not one vLLM's CPU backend supports "
            f"({', '.join(map(str, _VLLM_CPU_HEAD_SIZES))})"
        )
    params = dict(
        family=family, hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
        num_kv_heads=num_kv_heads, seed=seed, builder=_builder_hash(),
    )
    if chat_template is not None:
        params["chat_template"] = hashlib.sha256(chat_template.encode()).hexdigest()[:16]
    marker = out_dir / _MARKER
    if marker.is_file():
        try:
            if json.loads(marker.read_text()) == params:
                return out_dir
        except json.JSONDecodeError:
            pass
    elif out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} is not empty and holds no tiny-model build; refusing to overwrite it")

    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    tok = build_tokenizer(family, chat_template)
    config = _model_config(family, tok, params)
    spec = SPECIAL_TOKENS[family]
    with atomic_dir(out_dir) as tmp:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    # Initialisation zeroes biases (Qwen2's q/k/v); real checkpoints have non-zero
                    # ones, and an engine that dropped them must show up in log-prob comparisons.
                    if name.endswith(".bias"):
                        p.normal_(0.0, config.initializer_range)
        model.generation_config = GenerationConfig(
            bos_token_id=tok.bos_token_id,
            eos_token_id=[tok.convert_tokens_to_ids(t) for t in spec["stop_tokens"]],
            pad_token_id=tok.pad_token_id,
            **_GENERATION_DEFAULTS[family],
        )
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / _MARKER).write_text(json.dumps(params, indent=2) + "\n")
    return out_dir


def tiny_models(root: Path | str) -> dict[str, Path]:
    """Build (or reuse) all four families under `root/<family>`."""
    root = Path(root)
    return {family: build_tiny_lm(family, root / family) for family in FAMILIES}
