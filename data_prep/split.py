"""`llmcore prep split`: cut a shard dir into a training dir and a held-out eval dir.

The held-out documents are exactly the ones `llmcore train --eval-docs N --seed S` would hold out
of the same dir (`loaders.train_eval_split`), so a run trained on the train part with
`--eval-docs 0` and evaluated on the eval part (`llmcore eval --data EVAL`) scores documents it
never saw.

Invariants: the source is verified first (checksums, counts, ids below its vocab) and never
changed; each output is a complete shard dir of the source's kind and tokenizer (its manifest
says where it came from: source path, seed, part) written atomically (temp dir, fsync, rename);
`--out-train`/`--out-eval` follow prep's `--out` rules (never a dir holding the source, and
`--overwrite` replaces only a shard dir of the same kind); both outputs are written before either
is installed, so a failure while writing leaves neither.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from llmcore.data_prep.format import MANIFEST_FILE
from llmcore.data_prep.loaders import train_eval_split
from llmcore.data_prep.prep import _ShardWriter, shard_dir_problem
from llmcore.data_prep.shards import ShardReader
from llmcore.errors import LLMCoreError
from llmcore.io import check_out_dir, install_dir, remove_leftovers, temp_dir_for, write_json

BLOCK_DOCS = 4096  # documents per record batch written


def _write_part(reader: ShardReader, idx: np.ndarray, tmp: Path, shard_docs: int) -> list[dict]:
    writer = _ShardWriter(tmp, reader.shard_kind, shard_docs)
    for start in range(0, len(idx), BLOCK_DOCS):
        docs = [reader.doc(int(i)) for i in idx[start : start + BLOCK_DOCS]]
        columns = {}
        for c in reader.columns:
            parts = [d[c] for d in docs]
            columns[c] = (
                np.concatenate(parts) if parts else np.zeros(0, np.uint16),
                np.array([len(p) for p in parts], dtype=np.int64),
            )
        writer.write(columns, len(docs))
    return writer.finish()


def split_shards(
    source: str | Path,
    eval_docs: int,
    out_train: str | Path,
    out_eval: str | Path,
    *,
    seed: int = 0,
    overwrite: bool = False,
    shard_docs: int = 200_000,
) -> tuple[dict, dict]:
    """Write the documents of the shard dir `source` into `out_train` (all but `eval_docs`) and `out_eval`
    (`eval_docs` chosen by `seed` as training's `--eval-docs` chooses them); returns both manifests."""
    src, train_dir, eval_dir = Path(source), Path(out_train), Path(out_eval)
    if eval_docs < 1:
        raise LLMCoreError(f"--eval-docs {eval_docs}: must be >= 1")
    if shard_docs < 1:
        raise LLMCoreError("shard_docs must be at least 1")
    if train_dir.resolve() == eval_dir.resolve():
        raise LLMCoreError(f"--out-train and --out-eval are the same dir ({train_dir})")
    reader = ShardReader(src)
    if eval_docs >= len(reader):
        raise LLMCoreError(f"--eval-docs {eval_docs} leaves no training documents ({src} holds {len(reader)})")
    kind = reader.shard_kind
    for out, flag in ((train_dir, "--out-train"), (eval_dir, "--out-eval")):
        check_out_dir(
            out,
            overwrite=overwrite,
            what=f"a shard dir of kind {kind.name}",
            inputs=[src],
            replaceable=lambda p: shard_dir_problem(p, kind),
            flag=flag,
        )
    reader.verify()
    train_idx, eval_idx = train_eval_split(len(reader), eval_docs, seed)
    manifests, tmps = [], []
    try:
        for out, idx, part in ((train_dir, train_idx, "train"), (eval_dir, eval_idx, "eval")):
            remove_leftovers(out.parent, out.name)
            tmp = temp_dir_for(out)
            tmps.append(tmp)
            shards = _write_part(reader, idx, tmp, shard_docs)
            manifest = {
                k: v for k, v in reader.manifest.items() if k not in ("shards", "num_docs", "num_tokens", "seconds")
            }
            manifest.update(
                num_docs=sum(s["num_docs"] for s in shards),
                num_tokens=sum(s["num_tokens"] for s in shards),
                shards=shards,
                split={
                    "source": str(src.resolve()),
                    "part": part,
                    "eval_docs": eval_docs,
                    "seed": seed,
                    "source_docs": len(reader),
                },
            )
            write_json(tmp / MANIFEST_FILE, manifest)
            manifests.append(manifest)
        for tmp, out in zip(tmps, (train_dir, eval_dir)):
            install_dir(tmp, out)
    except BaseException:
        for tmp in tmps:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifests[0], manifests[1]


__all__ = ["split_shards"]
