"""Running the product's inference workflow (``python -m monai.bundle run inference``) in the product environment.

The MONAI Label server runs in its own environment (pydicom 2, which ``monailabel`` needs); the model code lives in
the product environment (pydicom 3). The app therefore never imports ``custom.*``: every synthesis is one
subprocess of the product's own CLI, so there is one implementation of the model, its preprocessing and its
input checks.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

logger = logging.getLogger(__name__)

__all__ = ["ProductSettings", "ProductError", "run_product", "product_env"]

#: variables of the label environment that must not leak into the product interpreter
_DROP_ENV = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "MONAI_LABEL_APP_DIR", "MONAI_LABEL_STUDIES",
             "MONAI_LABEL_APP_CONF")


@dataclass
class ProductSettings:
    repo: Path
    python: Path
    config_files: list[str]
    ckpt_dir: Path
    timeout: float = 900.0
    extra: dict[str, Any] = field(default_factory=dict)

    def config_arg(self) -> str:
        return "[" + ",".join(repr(str(f)) for f in self.config_files) + "]"


class ProductError(RuntimeError):
    """The product CLI failed. ``kind``: ``"input"`` (its one-line ``ERROR:`` message: bad request data),
    ``"timeout"``, ``"crash"`` (anything else: a bug or a broken installation)."""

    def __init__(self, kind: str, message: str, log: str = ""):
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.log = log


def product_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _DROP_ENV}
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    return env


def _cli_value(value: Any) -> str:
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def run_product(settings: ProductSettings, args: Mapping[str, Any], replacements: Sequence[tuple[str, str]] = (),
                script: Sequence[str] | None = None) -> subprocess.CompletedProcess:
    """Run ``monai.bundle run inference`` (or ``script``, a module/file + its arguments) with ``--key value`` for each
    of ``args`` (``None`` values left out), cwd = the repository. The process runs in its own session; on timeout the
    whole group is killed.

    Raises:
        ProductError: non-zero exit status (``kind="input"`` with the product's ``ERROR:`` line, paths listed in
        ``replacements`` rewritten for the reader), or a timeout.
    """
    if script is None:
        cmd = [str(settings.python), "-m", "monai.bundle", "run", "inference", "--config_file", settings.config_arg(),
               "--ckpt_dir", str(settings.ckpt_dir)]
    else:
        cmd = [str(settings.python), *script]
    for key, value in {**settings.extra, **dict(args)}.items():
        if value is None:
            continue
        cmd += [f"--{key}", _cli_value(value)]
    logger.info("product: %s", " ".join(cmd))
    start = time.time()
    proc = subprocess.Popen(cmd, cwd=str(settings.repo), env=product_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=settings.timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        out, err = proc.communicate()
        raise ProductError("timeout", f"the synthesis did not finish within {settings.timeout:.0f} s "
                                      "(raise --conf timeout, or use fewer steps)", (out or "") + (err or ""))
    logger.info("product: exit %s after %.1f s", proc.returncode, time.time() - start)
    if proc.returncode != 0:
        lines = [ln for ln in (err or "").splitlines() if ln.strip()]
        errors = [ln[len("ERROR:"):].strip() for ln in lines if ln.startswith("ERROR:")]
        log = (out or "")[-4000:] + "\n" + (err or "")[-4000:]
        if errors:
            message = errors[-1]
            for old, new in replacements:
                message = message.replace(old, new)
            raise ProductError("input", message, log)
        tail = " | ".join(lines[-3:])[-800:]
        raise ProductError("crash", f"the synthesis failed (exit status {proc.returncode}): {tail}", log)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
