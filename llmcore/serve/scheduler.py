"""The batching scheduler: one worker thread owns the model and runs queued requests in batches.

Invariants:
- Tokens come only from `llmcore.generate.generate_steps`, the function under `llmcore generate`, so a
  greedy request (temperature 0) served on its own gives the same tokens and text as `llmcore generate`.
- Requests wait in a bounded FIFO queue (full: 429); the worker takes the oldest one and, up to
  `max_batch`, later ones with the same sampling settings (`SamplingParams.batch_key`), and runs them
  as one left-padded batch with the KV cache (generate.py's padding keeps every row's positions and
  attention exactly those it has alone). A request with a `seed` and temperature > 0 always runs
  alone with its own `torch.Generator`, so its output does not depend on other traffic. Each row has
  its own text, stop strings, token budget and event queue: outputs never mix.
- Stop-safe streaming (`_Row`): text is emitted only once it decodes to whole characters and cannot be
  the start of a stop string, so the streamed pieces join to exactly the non-streamed text.
  `completion_tokens` counts every token the model produced for the row, the end-of-text token included.
- A cancelled job (its client went away) is dropped from the queue, a running row stops, and a batch
  whose rows are all finished or cancelled stops at once, freeing the worker.
- Completion logprobs come from `score`: one teacher-forced forward pass, on the worker thread
  (which alone runs the model).
- Importing this module needs no torch; it is imported when a batch runs.
"""

import logging
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from llmcore.errors import LLMCoreError
from llmcore.serve.requests import ApiError, SamplingParams

if TYPE_CHECKING:  # pragma: no cover
    from llmcore.model import LLM

log = logging.getLogger("llmcore.serve")  # one logger for the package (`--log-level` sets it)

Event = tuple[Any, ...]  # ("text", str) | ("done", finish_reason, completion_tokens) | ("error", message)


@dataclass
class Job:
    """One request's work: prompt ids, resolved sampling settings and where its events go."""

    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[Event], None]
    cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def max_tokens(self) -> int:
        assert self.params.max_tokens is not None
        return self.params.max_tokens


def _holdback(text: str, stops: list[str]) -> int:
    """Length of the longest end of `text` that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


class _Row:
    """Per-request decoding state: tokens so far, text sent, stop strings, budget."""

    def __init__(
        self, job: Job, tokenizer: Any, scorer: Callable[[list[int], int], dict[str, Any]] | None = None
    ) -> None:
        self.job, self.tokenizer, self.scorer = job, tokenizer, scorer
        self.ids: list[int] = []
        self.sent = ""
        self.produced = 0
        self.done = False

    def _send_upto(self, text: str) -> None:
        if len(text) > len(self.sent) and text.startswith(self.sent):
            self.job.emit(("text", text[len(self.sent) :]))
            self.sent = text

    def _first_stop(self, text: str) -> int:
        hits = [i for i in (text.find(s) for s in self.job.params.stop) if i >= 0]
        return min(hits) if hits else -1

    def push(self, token: int, eos_id: int | None) -> None:
        """Take the next token; finishes the row on eos, a stop string or the token budget."""
        self.produced += 1
        if eos_id is not None and token == eos_id:
            self.finish("stop")
            return
        self.ids.append(token)
        # A character whose bytes are not all there yet decodes to U+FFFD at the end; everything before
        # it is final (UTF-8 resynchronises), so stops are searched and text sent up to it.
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True).rstrip("\ufffd")
        cut = self._first_stop(text)
        if cut >= 0:
            self._send_upto(text[:cut])
            self._end("stop")
            return
        self._send_upto(text[: len(text) - _holdback(text, self.job.params.stop)])
        if self.produced >= self.job.max_tokens:
            self.finish("length")

    def finish(self, reason: str) -> None:
        """Send the rest of the text (cut at a stop string) and end the row."""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = self._first_stop(text)
        if cut >= 0:
            text, reason = text[:cut], "stop"
        self._send_upto(text)
        self._end(reason)

    def _end(self, reason: str) -> None:
        self.done = True
        if self.job.params.logprobs is not None and self.scorer is not None:
            self.job.emit(("logprobs", self.scorer(self.job.prompt_ids + self.ids, self.job.params.logprobs)))
        self.job.emit(("done", reason, self.produced))


class BatchScheduler:
    """The model behind a worker thread: `submit(job)` queues a request; events flow back through `job.emit`."""

    def __init__(self, model: "LLM", tokenizer: Any, max_batch: int = 8, max_queue: int = 256) -> None:
        if max_batch < 1:
            raise LLMCoreError(f"--max-batch must be at least 1, got {max_batch}")
        if max_queue < 1:
            raise LLMCoreError(f"--max-queue must be at least 1, got {max_queue}")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.context = int(model.config.max_position_embeddings)
        self.eos_id = tokenizer.eos_id
        self._pending: deque[Job] = deque()
        self._cv = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="llmcore-serve-worker", daemon=True)
        self.batches_run = 0  # counters for tests, benchmarks and logs
        self.max_batch_seen = 0
        self.tokens_produced = 0  # tokens handed to rows that were still listening
        self.rows_cancelled = 0  # running rows dropped because their client left
        self.busy = False  # a batch is running

    def start(self) -> "BatchScheduler":
        self._thread.start()
        return self

    def close(self, timeout: float = 10.0) -> None:
        """Stop taking work; queued requests get an error event; waits for the running batch."""
        with self._cv:
            self._closed = True
            pending, self._pending = list(self._pending), deque()
            self._cv.notify_all()
        for job in pending:
            job.emit(("error", "the server is shutting down"))
        if self._thread.is_alive():
            self._thread.join(timeout)

    def queued(self) -> int:
        with self._cv:
            return len(self._pending)

    def submit(self, job: Job) -> None:
        if job.params.max_tokens is None or len(job.prompt_ids) + job.max_tokens > self.context:
            raise ValueError("job.params.max_tokens must be resolved against the context before submit")
        with self._cv:
            if self._closed:
                raise ApiError(503, "the server is shutting down", type_="server_error")
            if len(self._pending) >= self.max_queue:
                raise ApiError(
                    429,
                    f"too many requests waiting ({self.max_queue}); retry later",
                    type_="rate_limit_error",
                    code="queue_full",
                )
            self._pending.append(job)
            self._cv.notify()

    def _take_batch(self) -> list[Job] | None:
        with self._cv:
            while True:
                while self._pending and self._pending[0].cancelled.is_set():
                    self._pending.popleft()
                if self._pending:
                    break
                if self._closed:
                    return None
                self._cv.wait()
            first = self._pending.popleft()
            batch = [first]
            key = first.params.batch_key()
            if key is None or self.max_batch == 1:
                return batch
            longest, budget = len(first.prompt_ids), first.max_tokens
            keep: deque[Job] = deque()
            while self._pending:
                job = self._pending.popleft()
                fits = max(longest, len(job.prompt_ids)) + max(budget, job.max_tokens) <= self.context
                if (
                    len(batch) < self.max_batch
                    and not job.cancelled.is_set()
                    and fits
                    and job.params.batch_key() == key
                ):
                    batch.append(job)
                    longest, budget = max(longest, len(job.prompt_ids)), max(budget, job.max_tokens)
                elif not job.cancelled.is_set():
                    keep.append(job)
            self._pending = keep
            return batch

    def _run(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            self.busy = True
            try:
                self._generate(batch)
            except Exception as err:  # the worker must survive anything one batch does
                log.exception("generation failed for a batch of %d", len(batch))
                for job in batch:
                    job.emit(("error", f"generation failed: {type(err).__name__}"))
            finally:
                self.busy = False

    def score(self, ids: list[int], top_n: int) -> dict[str, Any]:
        """Log-probabilities of `ids` under the model, one teacher-forced forward pass (the first token
        has none): `tokens` (each id decoded alone), `token_logprobs`, `top_logprobs` (per position the
        `top_n` likeliest tokens and the actual one, `{text: logprob}`; None when `top_n` is 0)."""
        import torch

        with torch.no_grad():
            x = torch.tensor([ids], device=self.model.embed_tokens.weight.device)
            logp = torch.log_softmax(self.model(x).logits[0, :-1].float(), dim=-1)
        actual = logp.gather(1, x[0, 1:, None]).squeeze(1).tolist()
        decode = self.tokenizer.decode
        top: list[dict[str, float] | None] | None = None
        if top_n > 0:
            top = [None]
            values, index = logp.topk(min(top_n, logp.shape[-1]), dim=-1)
            for lp, vs, js, tok in zip(actual, values.tolist(), index.tolist(), ids[1:]):
                entry: dict[str, float] = {}
                for v, j in zip(vs, js):
                    entry.setdefault(decode([j]), v)  # two ids may decode alike: keep the likelier
                entry.setdefault(decode([tok]), lp)
                top.append(entry)
        return {"tokens": [decode([i]) for i in ids], "token_logprobs": [None] + actual, "top_logprobs": top}

    def _generate(self, batch: list[Job]) -> None:

        from llmcore.generate import generate_steps, seeded_generator

        p = batch[0].params
        self.batches_run += 1
        self.max_batch_seen = max(self.max_batch_seen, len(batch))
        generator = seeded_generator(self.model, p.seed)
        rows = [_Row(job, self.tokenizer, self.score) for job in batch]
        steps = generate_steps(
            self.model,
            [job.prompt_ids for job in batch],
            max_new_tokens=max(job.max_tokens for job in batch),
            temperature=p.temperature,
            top_k=p.top_k,
            top_p=p.top_p,
            repetition_penalty=p.repetition_penalty,
            eos_id=self.eos_id,
            generator=generator,
        )
        try:
            for tokens, _active in steps:
                if self._closed:  # shutting down: end the running rows now rather than at their budget
                    for row in rows:
                        if not row.done:
                            row.done = True
                            row.job.emit(("error", "the server is shutting down"))
                    break
                for row, token in zip(rows, tokens.tolist()):
                    if row.done:
                        continue
                    if row.job.cancelled.is_set():
                        row.done = True  # nobody is listening; nothing to send
                        self.rows_cancelled += 1
                        continue
                    row.push(int(token), self.eos_id)
                    self.tokens_produced += 1
                if all(row.done for row in rows):
                    break
        finally:
            steps.close()
        for row in rows:
            if not row.done:  # generate_steps ended without this row's end (cannot happen; be safe)
                row.finish("length")
