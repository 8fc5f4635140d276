"""`prep download`: fetch one file of a ModelScope dataset repo, atomically and with bounded waiting.

The hub is probed first with short timeouts, so an offline machine gets one clear line within
seconds. The download itself runs in a child process (the modelscope client retries on its own
and cannot be interrupted from a thread) into a temp dir beside the output; the child is killed
when nothing arrives for `timeout` seconds, and the file is renamed to its final name only after
the client reports success. A partial file therefore never carries the final name.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import urlparse

from llmcore.errors import LLMCoreError, install_hint
from llmcore.io import install_file

DEFAULT_ENDPOINT = "https://www.modelscope.cn"


def _endpoint() -> str:
    """The hub address the modelscope client will use (its MODELSCOPE_DOMAIN override included).

    Worked out here rather than by importing modelscope, whose import alone takes seconds.
    """
    domain = os.environ.get("MODELSCOPE_DOMAIN")
    if not domain:
        return DEFAULT_ENDPOINT
    return domain if "://" in domain else "https://" + domain


def probe_hub(endpoint: str, timeout: float) -> None:
    """Raise LLMCoreError unless `endpoint` answers an HTTP request within `timeout` seconds."""
    import requests

    try:
        requests.head(endpoint, timeout=(timeout, timeout), allow_redirects=False)
    except requests.RequestException as err:
        # requests nests the root cause as "... (Caused by NameResolutionError(... [Errno -2] Name or service not known)"))";
        # keep the cause's class and its errno text when there is one.
        text = " ".join(str(err).split())
        cause = re.search(r"Caused by (\w+)\(", text)
        detail = re.search(r"\[Errno [^\]]*\][^)\"']*", text)
        reason = cause.group(1) if cause else type(err).__name__
        if detail:
            reason += ": " + detail.group(0).strip()
        host = urlparse(endpoint).netloc or endpoint
        raise LLMCoreError(f"cannot reach ModelScope at {host} (offline?): {reason[:200]}") from None


def _dir_bytes(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:
                pass
    return total


def download(
    dataset: str,
    file: str,
    out_dir: str | Path,
    timeout: float = 30.0,
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Download `file` of ModelScope dataset `dataset` to `out_dir/<basename>`; returns that path.

    Fails with LLMCoreError (and no file under the final name) when the hub is unreachable or
    no bytes arrive for `timeout` seconds.
    """
    if importlib.util.find_spec("modelscope") is None:
        raise LLMCoreError("downloading needs modelscope: " + install_hint("download"))
    out = Path(out_dir)
    final = out / Path(file).name
    if final.exists() and not overwrite:
        raise LLMCoreError(f"{final} already exists (pass --overwrite to replace it)")
    endpoint = _endpoint()
    probe_hub(endpoint, timeout=min(timeout, 10.0))

    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".download-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    env = dict(os.environ, MODELSCOPE_CACHE=str(tmp / "cache"))
    cmd = [sys.executable, "-m", "llmcore.data_prep.download", dataset, file, str(tmp / "files")]
    child = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(unit="B", unit_scale=True, desc=f"download {Path(file).name}", file=sys.stderr, disable=None)
    try:
        seen, last_change = 0, time.monotonic()
        while child.poll() is None:
            time.sleep(0.5)
            now_bytes = _dir_bytes(tmp)
            if now_bytes != seen:
                if bar is not None:
                    bar.update(max(0, now_bytes - seen))
                seen, last_change = now_bytes, time.monotonic()
            elif time.monotonic() - last_change > timeout:
                child.kill()
                child.wait()
                raise LLMCoreError(f"download of {dataset}/{file} stalled: no data for {timeout:.0f} s")
        err_text = child.stderr.read() if child.stderr else ""
        if child.returncode != 0:
            lines = [line for line in err_text.strip().splitlines() if line.strip()]
            raise LLMCoreError(
                f"download of {dataset}/{file} failed: {lines[-1] if lines else f'exit {child.returncode}'}"
            )
        got = tmp / "files" / file
        if not got.is_file():
            raise LLMCoreError(f"download of {dataset}/{file} finished but the file is missing")
        install_file(got, final)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if bar is not None:
            bar.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _child(dataset: str, file: str, local_dir: str) -> None:
    from modelscope.hub.file_download import dataset_file_download

    dataset_file_download(dataset, file, local_dir=local_dir)


if __name__ == "__main__":
    _child(*sys.argv[1:4])
