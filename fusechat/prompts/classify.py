"""Tell code and math prompts apart from the rest (the recipe removes them from the instruction
and Chinese sets, which it fills with general chat only).

A heuristic, in this order; the first rule that fires names the reason recorded for the drop:
1. Magpie's own `task_category` ("Coding & Debugging" -> code, "Math" -> math) where present.
2. Code: a fenced code block; a request to write/implement a function, program, script, class,
   query, ... ("a Python script", "a function that/to ..."; 编写/实现 ... 函数/程序/代码 in Chinese);
   a line that starts like source code
   (`def `, `#include`, `public static`, `SELECT ... FROM`, ...).
3. Math: LaTeX commands or `$...$` with math inside; "solve for x" / "solve the equation"; "find the
   value/sum/area/probability/..."; an arithmetic expression after "what is/calculate/compute/
   evaluate"; a "how many/how much" question with at least two numbers (word problems); the
   Chinese counterparts (计算 but not 计算机, 解方程, 求...的值, 等于多少, 多少 + two numbers).
The rules favour recall on clear signals; a prompt that merely mentions a language or a number is
kept. Each drop's rule name lands in prompts/dropped.parquet, so the rules can be audited on data.
"""

from __future__ import annotations

import re

CATEGORY_DOMAINS = {"coding & debugging": "code", "math": "math"}

_I = re.IGNORECASE
_VERB = r"(write|create|implement|develop|generate|fix|debug|refactor|complete|optimi[sz]e|give me)"
_LANGUAGE = (
    r"(python|java|javascript|typescript|c\+\+|c#|golang|go|rust|ruby|php|sql|bash|shell|kotlin|swift|"
    r"matlab|scala|perl|haskell|html|css|react)"
)
# "program" and "code" alone are too common in plain English ("a wedding program", "a code of
# conduct"): without a language in front they count only when followed by "that/to/in/...".
_ARTIFACT = r"(functions?|scripts?|programs?|code|class|method|query|snippet|regex|regular expression)"
_RULES: tuple[tuple[str, str, re.Pattern[str]], ...] = (
    ("code", "fenced code block", re.compile(r"```")),
    (
        "code",
        "asks for code",
        re.compile(
            rf"\b{_VERB}\b[^.?!\n]{{0,40}}?(\b{_LANGUAGE}\s+{_ARTIFACT}\b|"
            rf"\b{_ARTIFACT}\s+(that|which|to|in|using|called|named|`))",
            _I,
        ),
    ),
    (
        "code",
        "source code line",
        re.compile(
            r"^\s*(def \w+\(|class \w+[:(]|#include\s*<|import \w+(\.\w+)*(\s+as\s+\w+)?\s*$|from \w+(\.\w+)* import |"
            r"public (static )?(void|class|int)|function \w*\s*\(|console\.log\(|SELECT .+ FROM )",
            re.M | _I,
        ),
    ),
    ("code", "asks for code (zh)", re.compile(r"(编写|写一个|写一段|写个|实现|设计|生成).{0,15}?(函数|程序|代码|脚本|类|SQL|查询语句)", _I)),
    ("code", "names a language (zh)", re.compile(rf"(用|使用|基于)\s*{_LANGUAGE}|{_LANGUAGE}\s*(代码|程序|函数|脚本|实现)", _I)),
    (
        "math",
        "latex",
        re.compile(
            r"\\(frac|dfrac|sqrt|int|sum|prod|lim|cdot|times|div|binom|dbinom|boxed|leq?|geq?|neq|pi|"
            r"theta|alpha|beta|infty|log|sin|cos|tan)\b|\$[^$\n]*[=^_\\][^$\n]*\$"
        ),
    ),
    ("math", "solve for", re.compile(r"\bsolve\s+(for\s+[a-z]\b|the\s+(equation|system|inequality))", _I)),
    (
        "math",
        "find the quantity",
        re.compile(
            r"\b(find|determine|compute|calculate|what is)\s+the\s+(value|sum|product|area|volume|"
            r"perimeter|circumference|probability|derivative|integral|roots?|remainder|"
            r"(smallest|largest|greatest|least)\s+(positive\s+)?(integer|number|value|prime))\b",
            _I,
        ),
    ),
    (
        "math",
        "arithmetic",
        re.compile(
            r"\b(what is|what's|calculate|compute|evaluate|simplify)\b[^.?\n]{0,30}?"
            r"\d+(\.\d+)?\s*[-+*/×÷^]\s*\(?\d",
            _I,
        ),
    ),
    ("math", "math (zh)", re.compile(r"计算(?!机)|解方程|解不等式|求.{0,20}?的值|等于(多少|几)|方程组")),
)
_WORD_PROBLEM = re.compile(r"\bhow (many|much)\b|多少|几(个|只|元|天|岁|人|次)", _I)
_NUMBER = re.compile(r"\d+(\.\d+)?")


def classify(text: str, task_category: str | None = None) -> tuple[str, str] | None:
    """("code"|"math", rule name) for a code or math prompt, None for anything else."""
    if task_category and task_category.strip().lower() in CATEGORY_DOMAINS:
        return CATEGORY_DOMAINS[task_category.strip().lower()], f"task_category {task_category!r}"
    for domain, name, pattern in _RULES:
        if pattern.search(text):
            return domain, name
    if _WORD_PROBLEM.search(text) and len(_NUMBER.findall(text)) >= 2:
        return "math", "word problem"
    return None
