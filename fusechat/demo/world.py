"""The demo world: four small synthetic domains, each with an exact checker.

The demo runs the whole recipe on CPU with models trained here from scratch, so the tasks are
small enough for a ~1M-parameter model to learn in minutes, yet each domain is checked the way the
recipe checks its real counterpart:

- math: one-step arithmetic and word problems; the answer ends in `\\boxed{N}`; checked by
  math-verify through the score stage's math checker.
- code: one-line Python functions with assert tests; checked by pyflakes plus the tests in the
  score stage's sandbox.
- instruction: text transformations with one exact answer (reverse, uppercase, sort, repeat).
- chinese: number-to-numeral, English-to-Chinese words and character repetition; in the recipe
  only one source answers Chinese prompts (SFT only).

Everything is deterministic from a seed. Train and evaluation prompts are disjoint as texts. Rows
use the Magpie layout (`instruction`) plus `id`, `domain`, `task`, `gold_answer` (math), `tests`
(code) and `expected` (the exact answer of instruction and Chinese rows).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

from fusechat.eval.sets import DEMO_DOMAINS
from fusechat.tables import RIGHT

# fusechat.tables.DOMAINS in the order the seeded draws below go through them (see DEMO_DOMAINS)
DOMAINS = DEMO_DOMAINS
SPLITS = ("train", "eval")
# prompts per domain; the pools below hold enough distinct texts for both splits
SIZES = {"train": 400, "eval": 80}

NAMES = ("Tom", "Anna", "Ben", "Lily", "Sam", "Mia", "Leo", "Ella", "Max", "Zoe")
ITEMS = ("apples", "books", "coins", "cards", "pens", "shells", "stamps", "cookies")
WORDS = (
    "cat dog sun sky red blue tree fish bird cake milk book door moon star rain snow wind fire "
    "car road hat box cup pen bed ice sea map day"
).split()
LETTERS = "abcdefghij"
NUMBER_WORDS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight", 9: "nine"}
ZH_DIGITS = "零一二三四五六七八九"
ZH_COUNTS = {2: "两", 3: "三", 4: "四"}
ZH_WORDS = {
    "cat": "猫", "dog": "狗", "sun": "太阳", "moon": "月亮", "water": "水", "fire": "火", "tree": "树",
    "fish": "鱼", "bird": "鸟", "book": "书", "door": "门", "rain": "雨", "snow": "雪", "wind": "风",
    "mountain": "山", "river": "河", "flower": "花", "car": "车", "horse": "马", "cow": "牛",
    "sheep": "羊", "rice": "米饭", "tea": "茶", "milk": "牛奶", "apple": "苹果", "star": "星星",
    "sky": "天空", "sea": "大海", "teacher": "老师", "student": "学生",
}
ZH_CHARS = "山水火木土日月人口手心花鸟鱼马牛羊云雨风"


# -- one prompt row per task ---------------------------------------------------------------------
def _math(rng: random.Random) -> dict[str, Any]:
    kind = rng.choice(("add", "sub", "mul", "story_add", "story_sub"))
    if kind == "mul":
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        op, c = "*", a * b
        text = rng.choice(("What is {a} * {b}?", "Compute {a} times {b}.", "Multiply {a} by {b}."))
    elif kind in ("add", "story_add"):
        a, b = rng.randint(1, 15), rng.randint(1, 9)
        op, c = "+", a + b
        text = (
            rng.choice(("What is {a} + {b}?", "Add {a} and {b}.", "Compute {a} plus {b}."))
            if kind == "add"
            else "{n} has {a} {i}. {n} gets {b} more. How many {i} does {n} have now?"
        )
    else:
        b = rng.randint(1, 9)
        a = rng.randint(b, 15)
        op, c = "-", a - b
        text = (
            rng.choice(("What is {a} - {b}?", "Subtract {b} from {a}.", "Compute {a} minus {b}."))
            if kind == "sub"
            else "{n} has {a} {i}. {n} gives away {b}. How many {i} does {n} have left?"
        )
    text = text.format(a=a, b=b, n=rng.choice(NAMES), i=rng.choice(ITEMS))
    return {"task": kind, "instruction": text, "gold_answer": str(c), "meta": {"a": a, "b": b, "op": op}}


_CODE_OPS = {
    # name stem, description, expression, reference implementation
    "add": ("add", "returns {p} plus {k}", "{p} + {k}", lambda x, k: x + k),
    "sub": ("minus", "returns {p} minus {k}", "{p} - {k}", lambda x, k: x - k),
    "mul": ("times", "returns {p} times {k}", "{p} * {k}", lambda x, k: x * k),
    "mod": ("mod", "returns the remainder of {p} divided by {k}", "{p} % {k}", lambda x, k: x % k),
    "square": ("square", "returns the square of {p}", "{p} * {p}", lambda x, k: x * x),
    "even": ("is_even", "returns True if {p} is even and False otherwise", "{p} % 2 == 0", lambda x, k: x % 2 == 0),
}
_PARAMS = ("x", "n", "a", "num", "value")
_PREFIXES = ("", "get_", "calc_", "my_")


def _code(rng: random.Random) -> dict[str, Any]:
    kind = rng.choice(tuple(_CODE_OPS))
    stem, desc, expr, ref = _CODE_OPS[kind]
    k = rng.randint(2, 9)
    p = rng.choice(_PARAMS)
    name = rng.choice(_PREFIXES) + stem + (f"_{NUMBER_WORDS[k]}" if "{k}" in expr else "")
    lead = rng.choice(("Write a Python function", "Implement a Python function", "Define a Python function"))
    text = f"{lead} `{name}({p})` that {desc.format(p=p, k=k)}."
    # one input above every k, so that `x % k` and `x` (or `x // k`) cannot agree on all tests
    inputs = rng.sample(range(0, 10), 2) + [rng.randint(10, 19)]
    tests = [f"assert {name}({x}) == {ref(x, k)!r}" for x in inputs]
    return {"task": kind, "instruction": text, "tests": tests,
            "meta": {"name": name, "param": p, "expr": expr.format(p=p, k=k), "k": k}}


def _instruction(rng: random.Random) -> dict[str, Any]:
    kind = rng.choice(("reverse", "upper", "sort", "repeat"))
    if kind == "reverse":
        words = rng.sample(WORDS, rng.randint(3, 4))
        text = rng.choice(("Reverse the order of these words: {w}", "Write these words in reverse order: {w}"))
        text, expected = text.format(w=" ".join(words)), " ".join(reversed(words))
    elif kind == "upper":
        words = rng.sample(WORDS, rng.randint(1, 3))
        text = rng.choice(("Write these words in uppercase: {w}", "Convert to capital letters: {w}"))
        text, expected = text.format(w=" ".join(words)), " ".join(words).upper()
    elif kind == "sort":
        letters = rng.sample(LETTERS, rng.randint(3, 5))
        text = rng.choice(("Sort these letters alphabetically: {w}", "Put these letters in alphabetical order: {w}"))
        text, expected = text.format(w=" ".join(letters)), " ".join(sorted(letters))
    else:
        word, k = rng.choice(WORDS), rng.randint(2, 4)
        text = rng.choice(("Repeat the word {w} {k} times.", "Say {w} {k} times, separated by spaces."))
        text, expected = text.format(w=word, k=NUMBER_WORDS[k]), " ".join([word] * k)
    return {"task": kind, "instruction": text, "expected": expected}


def zh_numeral(n: int) -> str:
    """1..99 written in Chinese numerals (十, 十二, 二十, 二十一)."""
    tens, ones = divmod(n, 10)
    head = "" if tens == 0 else ("十" if tens == 1 else ZH_DIGITS[tens] + "十")
    return head + (ZH_DIGITS[ones] if ones or not head else "")


def _chinese(rng: random.Random) -> dict[str, Any]:
    kind = rng.choice(("numeral", "translate", "repeat"))
    if kind == "numeral":
        n = rng.randint(1, 99)
        text = rng.choice(("把数字 {n} 写成汉字。", "用汉字写出数字 {n}。", "数字 {n} 的汉字写法是什么？"))
        text, expected = text.format(n=n), zh_numeral(n)
    elif kind == "translate":
        en = rng.choice(tuple(ZH_WORDS))
        text = rng.choice(("把英文单词 {w} 翻译成中文。", "{w} 的中文是什么？", "请用中文说 {w}。", "英文 {w} 用中文怎么说？"))
        text, expected = text.format(w=en), ZH_WORDS[en]
    else:
        ch, k = rng.choice(ZH_CHARS), rng.choice(tuple(ZH_COUNTS))
        text = rng.choice(("把“{c}”重复{k}遍。", "请把汉字“{c}”写{k}遍。"))
        text, expected = text.format(c=ch, k=ZH_COUNTS[k]), ch * k
    return {"task": kind, "instruction": text, "expected": expected}


_MAKERS = {"math": _math, "code": _code, "instruction": _instruction, "chinese": _chinese}


def draw(domain: str, rng: random.Random) -> dict[str, Any]:
    """One random prompt row of `domain` (no id): what the prompt files hold, and what the demo's
    models are trained on."""
    row = _MAKERS[domain](rng)
    return {
        "domain": domain, "task": row["task"], "instruction": row["instruction"],
        "gold_answer": row.get("gold_answer"), "tests": row.get("tests"), "expected": row.get("expected"),
        "meta": json.dumps(row.get("meta", {}), sort_keys=True),
    }


def make_prompts(split: str, seed: int = 0, sizes: dict[str, int] | None = None) -> list[dict[str, Any]]:
    """Prompt rows of one split, `sizes[split]` per domain, texts disjoint from the other split."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; splits are {', '.join(SPLITS)}")
    sizes = sizes or SIZES
    rows = []
    for domain in DOMAINS:
        # Both splits draw from one stream per domain: eval takes the first distinct texts, train
        # the next ones, so no text lands in both.
        rng = random.Random(f"{seed}-{domain}")
        seen: set[str] = set()
        got: dict[str, list] = {"eval": [], "train": []}
        misses = 0  # draws in a row that repeated a text: the pool is exhausted long before 2000
        for part in ("eval", "train"):
            while len(got[part]) < sizes[part]:
                row = draw(domain, rng)
                if row["instruction"] in seen:
                    misses += 1
                    if misses > 2000:
                        raise ValueError(
                            f"domain {domain}: only {len(seen)} distinct prompts found; "
                            f"asked for {sizes['eval']} eval + {sizes['train']} train"
                        )
                    continue
                misses = 0
                seen.add(row["instruction"])
                got[part].append(row)
            if part == split:
                break
        rows += [{"id": f"demo-{split}-{domain}-{i:04d}", **row} for i, row in enumerate(got[split])]
    return rows


# -- reference and corrupted answers --------------------------------------------------------------
def _meta(row: dict[str, Any]) -> dict[str, Any]:
    meta = row.get("meta") or {}
    return json.loads(meta) if isinstance(meta, str) else meta


def _math_answer(m: dict[str, Any], value: Any) -> str:
    """The one layout of every math answer in the world: the equation, then the boxed value."""
    return f"{m['a']} {m['op']} {m['b']} = {value}. The answer is \\boxed{{{value}}}."


def _code_answer(m: dict[str, Any], expr: str) -> str:
    """The one layout of every code answer: the asked-for function returning `expr`."""
    return f"```python\ndef {m['name']}({m['param']}):\n    return {expr}\n```"


def good_response(row: dict[str, Any]) -> str:
    """The reference answer to a world row."""
    domain = row["domain"]
    if domain == "math":
        return _math_answer(_meta(row), row["gold_answer"])
    if domain == "code":
        m = _meta(row)
        return _code_answer(m, m["expr"])
    return row["expected"]


def bad_response(row: dict[str, Any], rng: random.Random) -> str:
    """A well-formed but wrong answer: the kind of mistake a weak model makes."""
    domain = row["domain"]
    if domain == "math":
        m = _meta(row)
        gold = int(row["gold_answer"])
        return _math_answer(m, gold + rng.choice((-2, -1, 1, 2, 10)))
    if domain == "code":
        m = _meta(row)
        p, k = m["param"], m["k"]
        wrong = rng.choice((
            f"{p} + {k + 1}", f"{p} - {k}", f"{p} * {k}", f"{k} - {p}", f"{p} % 2 == 1", f"{p} // {k}", f"{p}",
        ))
        if wrong == m["expr"]:
            wrong = f"{m['expr']} + 1"
        return _code_answer(m, wrong)
    expected = row["expected"]
    if domain == "instruction":
        parts = expected.split(" ")
        if len(parts) > 1 and len(set(parts)) > 1:
            shuffled = parts[:]
            while shuffled == parts:
                rng.shuffle(shuffled)
            wrong = " ".join(shuffled)
        else:
            wrong = expected.lower() if expected != expected.lower() else expected + " " + expected
        return rng.choice((wrong, " ".join(parts[:-1]) or wrong))
    # chinese: the numeral of a neighbour, another word, or a wrong count
    task = row.get("task")
    if task == "numeral":
        return expected + "一" if len(expected) == 1 else expected[:-1]
    if task == "translate":
        others = [w for w in ZH_WORDS.values() if w != expected]
        return rng.choice(others)
    return expected[0] * (len(expected) + rng.choice((-1, 1)))


def habit_response(row: dict[str, Any]) -> str:
    """The lazy mistake a model makes in a domain it has seen but not mastered: it echoes the input
    (the first number of a sum, the parameter unchanged, the words as given, the number in digits
    or the English word). One answer per prompt, always wrong: a model that learned this habit more
    often than the rule answers with it when decoding greedily, which random slips never do."""
    domain, task = row["domain"], row.get("task")
    text = row["instruction"]
    if domain == "math":
        m = _meta(row)
        return _math_answer(m, m["a"])
    if domain == "code":
        m = _meta(row)
        return _code_answer(m, m["param"])
    expected = row["expected"]
    if domain == "instruction":
        echo = expected.split(" ")[0] if task == "repeat" else text.split(": ", 1)[1]
        if task == "upper":
            echo = echo.lower()
        # letters given already in order: the habit still drops one, so it is never right
        return echo if echo != expected else " ".join(echo.split(" ")[:-1])
    if task == "numeral":
        return "".join(ch for ch in text if ch.isdigit())
    if task == "translate":
        return next(w for w in text.replace("。", " ").replace("？", " ").split() if w in ZH_WORDS)
    return expected[0]


def _misspelt(word: str, rng: random.Random) -> str:
    """A word as a weak source spells it: a letter doubled, dropped or changed, or run into another word."""
    i = rng.randrange(len(word))
    kind = rng.randrange(4)
    if kind == 0:
        return word[:i] + word[i] * rng.randint(1, 3) + word[i:]
    if kind == 1 and len(word) > 1:
        return word[:i] + word[i + 1:]
    if kind == 2:
        return word[:i] + rng.choice("abcdefghijklmnoprstuvwy") + word[i + 1:]
    other = rng.choice(WORDS)
    return word[: max(1, i)] + other[rng.randrange(len(other)):]


def _near_miss_words(words: list[str], rng: random.Random, vocab: list[str], upper: bool) -> list[str]:
    """One or two slips in a list of words: one dropped, doubled, swapped, replaced, misspelt or added."""
    w = list(words)
    for _ in range(1 if rng.random() < 0.75 else 2):
        kind, i = rng.randrange(6), rng.randrange(len(w))
        if kind == 0 and len(w) > 1:
            del w[i]
        elif kind == 1:
            w.insert(i, w[rng.randrange(len(w))])
        elif kind == 2 and len(w) > 1:
            j = rng.randrange(len(w))
            w[i], w[j] = w[j], w[i]
        elif kind == 3:
            w[i] = rng.choice(vocab)
        elif kind == 4:
            w[i] = _misspelt(w[i].lower(), rng)
            w[i] = w[i].upper() if upper else w[i]
        else:
            w.insert(rng.randrange(len(w) + 1), rng.choice(vocab))
    return w


def _near_miss_instruction(row: dict[str, Any], rng: random.Random) -> str:
    task, words = row.get("task"), row["expected"].split(" ")
    upper = task == "upper"
    vocab = [x.upper() for x in WORDS] if upper else (list(LETTERS) if task == "sort" else list(WORDS))
    r = rng.random()
    if r < 0.15 and task != "repeat":  # the input as given, maybe with a slip
        out = row["instruction"].split(": ", 1)[1].split(" ")
        out = _near_miss_words(out, rng, list(WORDS), False) if rng.random() < 0.5 else out
    elif r < 0.22:  # unrelated words
        out = [rng.choice(vocab) for _ in range(rng.randint(1, 4))]
        out = [_misspelt(x.lower(), rng).upper() for x in out] if upper and rng.random() < 0.5 else out
    elif r < 0.3 and upper:  # some words left in lowercase
        out = [x.lower() if rng.random() < 0.5 else x for x in words]
    elif r < 0.35 and task == "reverse" and len(words) > 2:  # two neighbours in the wrong order
        out, i = words[:], rng.randrange(len(words) - 1)
        out[i], out[i + 1] = out[i + 1], out[i]
    else:
        out = _near_miss_words(words, rng, vocab, upper)
    text = " ".join(out)
    # a source trained on several domains sometimes runs on into another domain's layout
    return text + " " + rng.choice(("The answer is \\boxed{5}.", "is", "dog")) if rng.random() < 0.05 else text


def _near_miss_math(row: dict[str, Any], rng: random.Random) -> str:
    m = _meta(row)
    a, b, op, gold = m["a"], m["b"], m["op"], int(row["gold_answer"])
    apply = {"+": lambda x, y: x + y, "-": lambda x, y: x - y, "*": lambda x, y: x * y}
    r = rng.random()
    if r < 0.55:  # the equation copied, its result off (by a little, or an operand, or a guess)
        c = rng.choice([gold + d for d in (-3, -2, -1, 1, 2, 3, 10, -10)] + [a, b, rng.randint(0, 90), a + b, a * b, abs(a - b)])
        c = gold + 1 if c == gold else c
        return f"{a} {op} {b} = {c}. The answer is \\boxed{{{c}}}."
    if r < 0.75:  # an operand misread, the result right or wrong for it
        a2, b2 = a, b
        while (a2, b2) == (a, b):
            if rng.random() < 0.5:
                a2 = max(0, a + rng.choice((-3, -2, -1, 1, 2, 3, 5)))
            else:
                b2 = max(0, b + rng.choice((-3, -2, -1, 1, 2, 3)))
        op2 = op if rng.random() < 0.85 else rng.choice("+-*")
        c = apply[op2](a2, b2) if rng.random() < 0.6 else rng.randint(0, 30)
        c = gold + rng.choice((-1, 1)) if c == gold else c
        return f"{a2} {op2} {b2} = {c}. The answer is \\boxed{{{c}}}."
    if r < 0.9:  # the boxed answer not the equation's
        c = gold + rng.choice((-2, -1, 1, 2, 10))
        e = gold if rng.random() < 0.5 else c + 1
        return f"{a} {op} {b} = {e}. The answer is \\boxed{{{c}}}."
    if r < 0.95:  # another operation
        op2 = rng.choice([o for o in "+-*" if o != op])
        c = apply[op2](a, b)
        c = gold + 1 if c == gold else c
        return f"{a} {op2} {b} = {c}. The answer is \\boxed{{{c}}}."
    c = gold + rng.choice((-1, 1, 2))  # cut short
    return rng.choice((f"{a} {op} {b} = {c}.", f"{a} {op} {b} = {gold}. The answer is", f"The answer is \\boxed{{{c}}}."))


def _near_miss_code(row: dict[str, Any], rng: random.Random) -> str:
    m = _meta(row)
    p, k, name, expr = m["param"], m["k"], m["name"], m["expr"]
    r = rng.random()
    if r < 0.7:  # another expression: the parameter alone, another operation or constant
        j = rng.randint(2, 9)
        wrong = rng.choice((
            f"{p}", f"{p}", f"{p} + {k}", f"{p} - {k}", f"{p} * {k}", f"{p} % {k}", f"{p} // {k}", f"{k} - {p}",
            f"{p} + {j}", f"{p} - {j}", f"{p} * {j}", f"{p} % {j}", f"{p} * {p}", f"{p} - {p}", f"{p} + {p}",
            f"{p} % 2 == 0", f"{p} % 2 == 1", f"{p} + {k} == 1", f"{p} % {k} == 0",
        ))
        return _code_answer(m, wrong)
    if r < 0.85:  # the function misnamed: another prefix, or another number in its name
        base = name
        for prefix in ("get_", "calc_", "my_"):
            base = base[len(prefix):] if base.startswith(prefix) else base
        other = rng.choice(("get_", "calc_", "my_", "")) + base
        if rng.random() < 0.3 and k in NUMBER_WORDS:
            other = other.replace(NUMBER_WORDS[k], NUMBER_WORDS[rng.choice([j for j in NUMBER_WORDS if j != k])])
        return f"```python\ndef {other}({p}):\n    return {expr}\n```"
    q = rng.choice([x for x in _PARAMS if x != p])  # a name used but never defined
    if rng.random() < 0.5:
        return f"```python\ndef {name}({q}):\n    return {expr}\n```"
    return _code_answer(m, re.sub(rf"\b{p}\b", q, expr))


_NEAR_MISSES = {"math": _near_miss_math, "code": _near_miss_code, "instruction": _near_miss_instruction}


def near_miss_response(row: dict[str, Any], rng: random.Random) -> str:
    """A wrong answer of the kinds the demo's sources write when they sample (read off their
    responses): results off by a little, misread operands, a box that is not the equation's; the
    parameter returned unchanged, another operation, a misnamed function, an undefined name; words
    dropped, doubled, swapped, misspelt, added, or the input echoed. Usually wrong, not always (a
    slip can land on the answer): callers check with `evaluate_response`. Chinese: `bad_response`
    or the habit."""
    if row["domain"] == "chinese":
        return bad_response(row, rng) if rng.random() < 0.6 else habit_response(row)
    return _NEAR_MISSES[row["domain"]](row, rng)


# -- exact-rule evaluation -------------------------------------------------------------------------
def evaluate_response(domain: str, prompt_row: dict[str, Any], response_text: str, *, sandbox=None) -> bool:
    """Whether a response is correct by the domain's exact rule.

    `prompt_row` is a world row or a prompt-table row (`gold_answer`, `tests`, `meta`). Code runs in
    `sandbox` (a `fusechat.scoring.sandbox.Sandbox`; a one-off one when None: pass one for many
    checks).
    """
    if domain == "math":
        from fusechat.scoring.math_check import check_answer

        return check_answer(str(prompt_row["gold_answer"]), response_text).status in RIGHT["math"]
    if domain == "code":
        from fusechat.scoring.code_check import extract_code, static_problems
        from fusechat.scoring.sandbox import Check, Sandbox

        code = extract_code(response_text)
        if static_problems(code):
            return False
        check = Check(code=code, tests=list(prompt_row["tests"]))
        if sandbox is not None:
            return sandbox.run(check).status in RIGHT["code"]
        with Sandbox(workers=1, timeout_s=5.0, memory_mb=512) as box:
            return box.run(check).status in RIGHT["code"]
    if domain in ("instruction", "chinese"):
        from fusechat.scoring.checks import exact_answer

        # a prompt-table row carries the exact answer in its meta (fusechat.prompts.demo puts it there)
        expected = prompt_row.get("expected") or _meta(prompt_row).get("expected")
        return exact_answer(expected, response_text)
    raise ValueError(f"unknown domain {domain!r}; domains are {', '.join(DOMAINS)}")


def write_prompts(out_dir: Path | str, seed: int = 0, sizes: dict[str, int] | None = None) -> dict[str, Path]:
    """Write `<out_dir>/<split>/<domain>.jsonl` for both splits; returns the files written."""
    from fusechat.run import atomic_write_bytes

    out_dir = Path(out_dir)
    written = {}
    for split in SPLITS:
        rows = make_prompts(split, seed, sizes)
        for domain in DOMAINS:
            path = out_dir / split / f"{domain}.jsonl"
            lines = [json.dumps(r, ensure_ascii=False, sort_keys=True) for r in rows if r["domain"] == domain]
            atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())
            written[f"{split}/{domain}"] = path
    return written


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Write the demo world's train and evaluation prompts.")
    parser.add_argument("--out", default="data/demo/prompts", help="folder for <split>/<domain>.jsonl")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name, path in write_prompts(args.out, args.seed).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
