"""Model outputs in the files AlpacaEval 2 and Arena-Hard read; judging is left to those tools.

- AlpacaEval 2: `alpacaeval2/<model>.json`, a JSON list of {instruction, output, generator,
  dataset}, instructions exactly as in the evaluation set (the judge matches on them).
- Arena-Hard: `arena_hard/model_answer/<model>.jsonl`, rows {question_id, answer_id, model_id,
  choices: [{index: 0, turns: [{content, token_len}]}], tstamp}. `token_len` is the answer's
  length in the answering model's own tokens (Arena-Hard counts tiktoken tokens for its length
  control; its scripts recompute that from the content).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from fusechat.run import atomic_write_bytes, stable_hash


def alpacaeval_rows(model: str, rows: list[tuple[dict, str]]) -> list[dict]:
    """(set row, output text) pairs -> AlpacaEval 2 records."""
    return [{"instruction": row["instruction"], "output": text, "generator": model,
             "dataset": row.get("dataset", "")} for row, text in rows]


def arena_hard_rows(model: str, revision: str, rows: list[tuple[dict, str, int]]) -> list[dict]:
    """(question row, answer text, answer tokens) triples -> Arena-Hard `model_answer` records."""
    now = time.time()
    return [{
        "question_id": row["question_id"],
        "answer_id": stable_hash(row["question_id"], model, revision, text, n=22),
        "model_id": model,
        "choices": [{"index": 0, "turns": [{"content": text, "token_len": int(tokens)}]}],
        "tstamp": now,
    } for row, text, tokens in rows]


def write_alpacaeval(folder: Path, model: str, records: list[dict]) -> Path:
    path = folder / "alpacaeval2" / f"{model}.json"
    atomic_write_bytes(path, json.dumps(records, ensure_ascii=False, indent=2).encode())
    return path


def write_arena_hard(folder: Path, model: str, records: list[dict]) -> Path:
    path = folder / "arena_hard" / "model_answer" / f"{model}.jsonl"
    atomic_write_bytes(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode())
    return path
