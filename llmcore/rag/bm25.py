"""BM25 over character bigrams (plus lower-cased ASCII words), for the optional hybrid mode.

Character bigrams need no word segmenter, so Chinese works as well as English. Built in memory from
the passages when first asked for (nothing is stored in the index dir).

Invariants: `top(query, n)` returns at most `n` passage ids with a positive score, best first, ties by
pid; the same passages and query always give the same ranking.
"""

from __future__ import annotations

import math
import re
from collections import Counter

import numpy as np

_WORD = re.compile(r"[a-z0-9]+")
_DROP = re.compile(r"[\s\W_]+", re.UNICODE)


def terms(text: str) -> list[str]:
    """Bigrams of the text's non-ASCII word characters, plus whole ASCII words."""
    t = text.lower()
    words = _WORD.findall(t)
    cjk = _DROP.sub("", _WORD.sub(" ", t))
    grams = [cjk[i : i + 2] for i in range(len(cjk) - 1)] if len(cjk) > 1 else list(cjk)
    return grams + words


class BM25:
    """Okapi BM25 (k1 1.2, b 0.75) over `texts`, whose ids are `pids`."""

    def __init__(self, texts: list[str], pids: np.ndarray, k1: float = 1.2, b: float = 0.75) -> None:
        self.pids = np.asarray(pids, dtype=np.int64)
        self.k1, self.b = k1, b
        self.postings: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        lengths = np.zeros(len(texts), dtype=np.float32)
        acc: dict[str, tuple[list[int], list[int]]] = {}
        for row, text in enumerate(texts):
            tf = Counter(terms(text))
            lengths[row] = sum(tf.values())
            for term, n in tf.items():
                rows, counts = acc.setdefault(term, ([], []))
                rows.append(row)
                counts.append(n)
        self.avgdl = float(lengths.mean()) if len(texts) else 0.0
        self.norm = k1 * (1 - b + b * lengths / max(self.avgdl, 1e-9))
        n_docs = len(texts)
        self.idf: dict[str, float] = {}
        for term, (rows, counts) in acc.items():
            df = len(rows)
            self.idf[term] = math.log(1 + (n_docs - df + 0.5) / (df + 0.5))
            self.postings[term] = (np.asarray(rows, dtype=np.int64), np.asarray(counts, dtype=np.float32))

    def scores(self, query: str) -> np.ndarray:
        s = np.zeros(len(self.pids), dtype=np.float32)
        for term, qtf in Counter(terms(query)).items():
            post = self.postings.get(term)
            if post is None:
                continue
            rows, tf = post
            s[rows] += qtf * self.idf[term] * tf * (self.k1 + 1) / (tf + self.norm[rows])
        return s

    def top(self, query: str, n: int) -> list[int]:
        s = self.scores(query)
        n = min(n, int((s > 0).sum()))
        if n <= 0:
            return []
        idx = np.argpartition(-s, n - 1)[:n]
        idx = idx[np.lexsort((self.pids[idx], -s[idx]))]
        return self.pids[idx].tolist()


__all__ = ["BM25", "terms"]
