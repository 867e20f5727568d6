"""Latency of the MONAI Label app as a clinician meets it: keep-mode syntheses through the REST API of a running server.

Two steps (the second needs only the standard library, so it runs in either environment)::

    # a model folder with the default architecture (random weights: the same compute as a trained model) when no
    # trained one exists; a trained bundle/models works as is
    python -m custom.serving.bench make_model --output_dir runs/bench_model --prepared_dir data/prepared
    # N sequential requests (keep mode, a box, 25 DDIM steps), then K concurrent ones (they queue)
    python -m custom.serving.bench measure --url http://127.0.0.1:8000 --image <datastore id> \\
        --box x0,y0,x1,y1 --steps 25 --requests 20 --concurrent 3

``measure`` prints p50 / p95 / max of the request times (client side: request sent -> answer read) and the queue
behaviour of the concurrent burst, as a Markdown table for ``bundle/docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path


def _post(url: str, params: dict, timeout: float = 600) -> tuple[int, dict, float]:
    boundary = uuid.uuid4().hex
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="params"\r\n\r\n{json.dumps(params)}\r\n'
            f"--{boundary}--\r\n").encode()
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, text = r.status, r.read()
    except urllib.error.HTTPError as err:
        status, text = err.code, err.read()
    seconds = time.perf_counter() - start
    try:
        answer = json.loads(text)
    except ValueError:
        answer = {}
    return status, answer, seconds


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def measure(url: str, image: str, box: str, steps: int, requests: int, concurrent: int, warmup: int = 1) -> str:
    target = f"{url.rstrip('/')}/infer/mammo_gcdm?image={urllib.parse.quote(image)}&output=json"
    params = {"lesion_box": box, "mode": "keep", "steps": steps, "result": "json"}
    for i in range(warmup):  # the worker may still be loading the model
        status, answer, _ = _post(target, {**params, "seed": 1000 + i})
        if status != 200:
            raise RuntimeError(f"warm-up request failed ({status}): {answer}")
    times = []
    for i in range(requests):
        status, answer, seconds = _post(target, {**params, "seed": i})
        if status != 200:
            raise RuntimeError(f"request {i} failed ({status}): {answer}")
        times.append(seconds)
    burst: list[tuple[int, float]] = []

    def one(i: int) -> None:
        status, _, seconds = _post(target, {**params, "seed": 2000 + i})
        burst.append((status, seconds))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(concurrent)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    cpu = platform.processor() or platform.machine()
    lines = [
        f"Keep-mode synthesis through `POST /infer/mammo_gcdm` ({steps} DDIM steps, a {box} box), "
        f"{requests} sequential requests after {warmup} warm-up; {os.cpu_count()} CPU cores ({cpu}); "
        f"load average at the end {os.getloadavg()[0]:.1f}.",
        "",
        "| requests | p50 (s) | p95 (s) | max (s) | mean (s) |",
        "| --- | --- | --- | --- | --- |",
        f"| {requests} | {_percentile(times, 0.5):.2f} | {_percentile(times, 0.95):.2f} | {max(times):.2f} | "
        f"{statistics.mean(times):.2f} |",
        "",
        f"Concurrent burst of {concurrent}: statuses {sorted(s for s, _ in burst)}, times "
        f"{', '.join(f'{t:.2f}' for _, t in sorted(burst, key=lambda x: x[1]))} s (they queue: one runs at a time).",
    ]
    return "\n".join(lines)


def make_model(output_dir: str, prepared_dir: str, config_files: list[str]) -> Path:
    """A model folder with the configured architecture and random weights (+ the prepared data's feature normaliser
    and lesion presets)."""
    import shutil

    import torch
    from monai.bundle import ConfigParser

    from custom.checkpoints import save_checkpoint, save_stage1
    from custom.features.presets import make_presets

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(Path(prepared_dir) / "feature_normalisation.json", out / "feature_normalisation.json")
    make_presets(Path(prepared_dir), out, min_members=1)
    parser = ConfigParser()
    parser.read_config(config_files)
    parser["device"] = "$torch.device('cpu')"
    torch.manual_seed(0)
    save_stage1(out / "autoencoder.pt", parser.get_parsed_content("autoencoder_def"), scale_factor=1.0)
    save_checkpoint(out / "model.pt", {"model": parser.get_parsed_content("network_def").state_dict()})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="action", required=True)
    mk = sub.add_parser("make_model")
    mk.add_argument("--output_dir", required=True)
    mk.add_argument("--prepared_dir", default="data/prepared")
    mk.add_argument("--config_file", default="bundle/configs/inference.json")
    me = sub.add_parser("measure")
    me.add_argument("--url", default="http://127.0.0.1:8000")
    me.add_argument("--image", required=True, help="datastore image id")
    me.add_argument("--box", required=True, help="x0,y0,x1,y1 inside the breast")
    me.add_argument("--steps", type=int, default=25)
    me.add_argument("--requests", type=int, default=20)
    me.add_argument("--concurrent", type=int, default=3)
    args = ap.parse_args(argv)
    if args.action == "make_model":
        print(make_model(args.output_dir, args.prepared_dir, [f for f in args.config_file.split(",") if f]))
        return 0
    try:
        print(measure(args.url, args.image, args.box, args.steps, args.requests, args.concurrent))
    except (OSError, RuntimeError) as err:
        print(f"ERROR: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
