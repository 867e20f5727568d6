"""The label app's side of the product's long-lived synthesis worker (``custom/serving/worker.py``).

The worker runs in the product environment (``<product python> -m custom.serving.worker``) with the model loaded
once; this client starts it (at app start, in the background), sends one JSON request per line on its stdin and reads
one JSON answer per line from its stdout. One request at a time (a lock; the app's queue is in front of it). A
request that outlives the timeout kills the worker's process group; the next request starts a new one. A worker that
dies is restarted on the next request.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import threading
import time
from typing import Any, Mapping

from lib.product import ProductError, ProductSettings, product_env

logger = logging.getLogger(__name__)

__all__ = ["WorkerClient"]


class WorkerClient:
    def __init__(self, settings: ProductSettings, num_threads: int = 0, start_timeout: float = 600.0):
        self.settings = settings
        self.num_threads = int(num_threads)
        self.start_timeout = float(start_timeout)
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self._next_id = 0
        self.info: dict[str, Any] = {}

    # ------------------------------------------------------------------------------------------------ process
    def _command(self) -> list[str]:
        return [str(self.settings.python), "-m", "custom.serving.worker", "--config_file",
                ",".join(str(f) for f in self.settings.config_files), "--ckpt_dir", str(self.settings.ckpt_dir),
                "--num_threads", str(self.num_threads)]

    def _readline(self, proc: subprocess.Popen, timeout: float) -> str:
        """One line of the worker's stdout, or '' when it ended; kills the worker after ``timeout`` seconds."""
        result: list[str] = []
        reader = threading.Thread(target=lambda: result.append(proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        if reader.is_alive():
            self._kill()
            reader.join(5)
            raise ProductError("timeout", f"the synthesis did not finish within {timeout:.0f} s (raise --conf "
                                          "timeout, or use fewer steps)")
        return result[0] if result else ""

    def _start(self) -> subprocess.Popen:
        cmd = self._command()
        logger.info("product worker: %s", " ".join(cmd))
        start = time.time()
        proc = subprocess.Popen(cmd, cwd=str(self.settings.repo), env=product_env(), stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=None, text=True, bufsize=1, start_new_session=True)
        self._proc = proc
        line = self._readline(proc, self.start_timeout)
        try:
            hello = json.loads(line) if line.strip() else {}
        except ValueError:
            hello = {}
        if not hello.get("ready"):
            self._kill()
            message = hello.get("message") or f"the product worker did not start (exit status {proc.poll()})"
            raise ProductError("crash", f"the model could not be loaded: {message}")
        self.info = {k: v for k, v in hello.items() if k != "ready"}
        logger.info("product worker ready in %.1f s: %s", time.time() - start, self.info)
        return proc

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            pass

    def start(self) -> None:
        """Start the worker now (the app calls this in a background thread so the first request finds it ready)."""
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                try:
                    self._start()
                except ProductError as err:
                    logger.error("%s", err.message)

    def close(self) -> None:
        with self._lock:
            if self._proc is not None and self._proc.stdin:
                try:
                    self._proc.stdin.close()
                    self._proc.wait(10)
                except (OSError, subprocess.TimeoutExpired):
                    pass
            self._kill()

    # ------------------------------------------------------------------------------------------------ requests
    def call(self, op: str, args: Mapping[str, Any]) -> dict[str, Any]:
        """Run one request; returns the worker's answer.

        Raises:
            ProductError: ``kind="input"`` (the product's one-line input error), ``"timeout"``, ``"crash"``.
        """
        with self._lock:
            proc = self._proc
            if proc is None or proc.poll() is not None:
                proc = self._start()
            self._next_id += 1
            rid = self._next_id
            line = json.dumps({"id": rid, "op": op, "args": {k: v for k, v in args.items() if v is not None}})
            try:
                proc.stdin.write(line + "\n")
                proc.stdin.flush()
            except OSError:
                self._kill()
                raise ProductError("crash", "the product worker ended unexpectedly; the next request restarts it")
            answer_line = self._readline(proc, self.settings.timeout)
            if not answer_line:
                self._kill()
                raise ProductError("crash", "the product worker ended during the request; the next request restarts it")
            answer = json.loads(answer_line)
        if answer.get("id") != rid:
            raise ProductError("crash", f"the product worker answered request {answer.get('id')} for {rid}")
        if not answer.get("ok"):
            raise ProductError(answer.get("kind", "crash"), str(answer.get("message", "the synthesis failed")))
        return answer
