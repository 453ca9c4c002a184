"""Near-duplicate removal (MinHash LSH) and n-gram decontamination against evaluation sets."""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterable, Iterator

NUM_PERM = 128
# Character 5-grams, not words: the Chinese sets have no spaces between words, and a one-word edit
# in a short English prompt still leaves most of its character shingles intact.
SHINGLE = 5
# Evaluation columns that hold the question, in order of preference (GSM8K `question`, MATH and
# AMC `problem`, HumanEval and sanitized MBPP `prompt`, full MBPP `text`).
EVAL_COLUMNS = ("prompt", "question", "problem", "text")
# An evaluation text shorter than the n-gram is matched as a whole, unless it is shorter than
# this: a 3-word question ("Compute 7!") would match ordinary prompts by chance.
MIN_SHORT_WORDS = 5


def shingles(text: str) -> set[bytes]:
    norm = " ".join(text.casefold().split())
    if len(norm) <= SHINGLE:
        return {norm.encode()}
    return {norm[i : i + SHINGLE].encode() for i in range(len(norm) - SHINGLE + 1)}


class NearDedup:
    """An LSH index of MinHash signatures; `find` answers which kept text a new one nearly repeats.

    LSH candidates are confirmed against the estimated Jaccard similarity, so `threshold` means
    what the recipe says rather than the banding's approximate cut-off.
    """

    def __init__(self, threshold: float):
        from datasketch import MinHashLSH

        self.threshold = threshold
        self.lsh = MinHashLSH(threshold=threshold, num_perm=NUM_PERM)
        self.signatures = {}

    @staticmethod
    def signatures_of(texts: Iterable[str]) -> Iterator:
        from datasketch import MinHash

        # generator() shares one permutation table across all signatures (a fresh MinHash would
        # rebuild it per text); seed fixed so signatures, and therefore drops, are reproducible.
        # crc32 instead of the default sha1: 4x faster here, stable across processes, and the
        # signature's random affine permutations sit on top of it anyway.
        return MinHash.generator(
            (list(shingles(t)) for t in texts), num_perm=NUM_PERM, seed=1, hashfunc=zlib.crc32
        )

    def find(self, signature) -> tuple[str, float] | None:
        best = None
        for key in self.lsh.query(signature):
            sim = signature.jaccard(self.signatures[key])
            if sim >= self.threshold and (best is None or sim > best[1]):
                best = (key, sim)
        return best

    def add(self, key: str, signature) -> None:
        if key not in self.signatures:
            self.lsh.insert(key, signature)
            self.signatures[key] = signature


def words(text: str) -> list[str]:
    return re.findall(r"\w+", text.casefold())


class Decontaminator:
    """Word n-grams of evaluation questions; a prompt sharing any one of them is contaminated."""

    def __init__(self, files: list[tuple[str, str]], n: int, load):
        """`files`: (name shown in reasons, resolved path); `load(path)` returns a datasets.Dataset."""
        self.n = n
        self.grams: dict[tuple[str, ...], str] = {}
        self.lengths: set[int] = set()
        self.counts: dict[str, dict[str, int | str]] = {}
        for name, path in files:
            table = load(path)
            column = next((c for c in EVAL_COLUMNS if c in table.column_names), None)
            if column is None:
                raise ValueError(
                    f"{name} ({path}): no question column; expected one of {', '.join(EVAL_COLUMNS)}, "
                    f"found {', '.join(table.column_names)}"
                )
            used = skipped = 0
            for text in table[column]:
                w = words(text or "")
                size = min(n, len(w))
                if size < min(n, MIN_SHORT_WORDS):
                    skipped += 1
                    continue
                used += 1
                self.lengths.add(size)
                for i in range(len(w) - size + 1):
                    self.grams.setdefault(tuple(w[i : i + size]), name)
            self.counts[name] = {"column": column, "texts": used, "too_short": skipped}

    def hit(self, text: str) -> str | None:
        """'<file>: "<n-gram>"' for the first evaluation n-gram found in `text`, else None."""
        w = words(text)
        for size in sorted(self.lengths, reverse=True):
            for i in range(len(w) - size + 1):
                gram = tuple(w[i : i + size])
                if gram in self.grams:
                    return f'{self.grams[gram]}: "{" ".join(gram)}"'
        return None
