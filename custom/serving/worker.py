"""A long-lived synthesis worker: the bundle's inference workflow with the model loaded once, one request per line.

The MONAI Label app (its own environment, pydicom 2) cannot import the product; it used to start
``python -m monai.bundle run inference`` per request (Python, torch and MONAI start-up, networks built, weights read:
about 26 s on 2 CPU cores). This worker runs in the product environment and keeps the diffusion network and the
stage-1 autoencoder in memory; each request is still the bundle's own ``inference`` workflow of
``bundle/configs/inference.json`` (the same cases, checks, sampler, writer and summary), parsed with the request's
overrides, with ``network`` and ``latent_encoder`` pointing at the loaded modules.

Protocol (stdin/stdout, one JSON object per line; nothing else is written to stdout)::

    -> {"id": 1, "op": "infer", "args": {"mode": "keep", "image_file": "...", "lesion_box": [x0, y0, x1, y1], ...}}
    <- {"id": 1, "ok": true, "seconds": 1.2}
    -> {"id": 2, "op": "breast_mask", "args": {"image_file": "...", "output": "mask.png"}}
    <- {"id": 2, "ok": false, "kind": "input", "message": "<file>: <reason>"}

``args`` are the keys of ``inference.json`` (what ``--key value`` sets on the command line). ``kind`` is ``input``
(the product's one-line input error, the request's fault) or ``crash`` (anything else; the worker keeps serving).
At start the worker loads the model (``inference.json#model``: the bundle's ``BundleModel``, which verifies the
checkpoints' checksums, rebuilds the network from ``configs/common.json`` + the checkpoint's record and loads it
strictly, stage 1 included) and checks the model info, then prints
``{"ready": true, ...}``; a model that does not load ends it with ``{"ready": false, "message": ...}``.

Run: ``python -m custom.serving.worker --config_file bundle/configs/inference.json --ckpt_dir bundle/models``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from monai.bundle import ConfigParser
from PIL import Image

from custom.data.prepare import load_display_image
from custom.engines.inference import describe_error
from custom.errors import MammoInputError
from custom.transforms.masks import breast_mask

__all__ = ["SynthesisWorker", "serve", "main"]

#: per-worker objects the per-request configs point at (``$custom.serving.worker.LOADED['model']``)
LOADED: dict[str, Any] = {}
#: request keys that would replace what the worker loaded once
FIXED_KEYS = ("model", "model_overrides", "network", "network_def", "latent_encoder", "ckpt_dir", "model_path", "stage1_checkpoint", "device",
              "handlers", "evaluator", "inference", "model_check", "bundle_root", "num_threads")


class SynthesisWorker:
    """The bundle's inference workflow with the networks loaded once.

    Args:
        config_files: the inference config files (``bundle/configs/inference.json`` first; later files override).
        ckpt_dir: the trained model folder (``model.pt``, ``autoencoder.pt``, ``feature_normalisation.json``).
        overrides: further fixed config keys (e.g. ``bundle_root``).
        num_threads: torch CPU threads (default: the config's ``num_threads``, 1 on CPU, as the CLI).
    """

    def __init__(self, config_files: Sequence[str], ckpt_dir: str, overrides: Mapping[str, Any] | None = None,
                 num_threads: int | None = None):
        self.config_files = [str(f) for f in config_files]
        # bundle_root: the folder holding the configs' folder (the workflows find it themselves only when run by
        # monai.bundle; this parser is not)
        root = Path(self.config_files[0]).resolve().parent.parent
        self.fixed = {"bundle_root": str(root), "ckpt_dir": str(ckpt_dir), **dict(overrides or {})}
        parser = self._parser()
        threads = num_threads or parser.get_parsed_content("num_threads")
        if threads:
            torch.set_num_threads(int(threads))
        # the bundle's model (configs/common.json + the checkpoint's record, weights strictly loaded after their
        # checksum was verified): built once, reused by every request
        model = parser.get_parsed_content("model")
        model.latent_encoder  # noqa: B018 - load (and check) stage 1 now, not at the first request
        parser.get_parsed_content("model_check")
        from custom.serving import worker as this_module  # also when run as __main__: the configs import this name

        this_module.LOADED.update(model=model)
        self.info = {"model_path": str(parser.get_parsed_content("model_path")), "threads": torch.get_num_threads()}

    def _parser(self) -> ConfigParser:
        parser = ConfigParser()
        parser.read_config(self.config_files)
        for key, value in self.fixed.items():
            parser[key] = value
        parser["progress"] = False
        parser["imports"] = list(parser["imports"]) + ["$import custom.serving.worker"]
        return parser

    def infer(self, args: Mapping[str, Any]) -> None:
        """One run of the bundle's ``inference`` workflow with ``args`` (config keys) and the loaded networks."""
        fixed = [k for k in args if k in FIXED_KEYS]
        if fixed:
            raise MammoInputError(None, f"request may not set {', '.join(fixed)} (fixed when the worker starts)")
        parser = self._parser()
        for key, value in args.items():
            parser[key] = value
        parser["model"] = "$custom.serving.worker.LOADED['model']"  # loaded (and verified) once, at start
        parser["model_check"] = None                      # checked once at start
        parser["num_threads"] = None                      # the worker's own setting
        with torch.inference_mode():
            parser.get_parsed_content("inference")

    @staticmethod
    def breast_mask(args: Mapping[str, Any]) -> None:
        """The breast outline of ``image_file`` (the ``prepare`` display pipeline + breast detection) as a 0/255 PNG
        at ``output`` (what whole-image synthesis follows when only the lesion was drawn)."""
        image, _ = load_display_image(args["image_file"])
        breast = breast_mask(image)
        if not breast.any():
            raise MammoInputError(args["image_file"], "no breast found in the image: draw the breast too")
        Image.fromarray(breast.astype(np.uint8) * 255).save(str(args["output"]))


def _answer(out: io.TextIOBase, obj: Mapping[str, Any]) -> None:
    try:
        out.write(json.dumps(obj) + "\n")
        out.flush()
    except BrokenPipeError:  # the client is gone: nothing left to serve
        sys.exit(0)


def serve(worker: SynthesisWorker, inp: io.TextIOBase, out: io.TextIOBase) -> None:
    """Answer requests from ``inp`` on ``out`` until ``inp`` ends (one JSON object per line each way)."""
    for line in inp:
        if not line.strip():
            continue
        start = time.perf_counter()
        rid = None
        try:
            req = json.loads(line)
            if not isinstance(req, dict):
                raise MammoInputError(None, "a request is a JSON object")
            rid = req.get("id")
            op, args = req.get("op", "infer"), req.get("args") or {}
            if not isinstance(args, dict):
                raise MammoInputError(None, "args must be a JSON object")
            if op == "infer":
                worker.infer(args)
            elif op == "breast_mask":
                worker.breast_mask(args)
            elif op == "ping":
                pass
            else:
                raise MammoInputError(None, f"unknown op {op!r} (infer, breast_mask, ping)")
            _answer(out, {"id": rid, "ok": True, "seconds": round(time.perf_counter() - start, 3)})
        except Exception as err:  # the worker outlives any one request
            message = describe_error(err)
            if isinstance(err, json.JSONDecodeError):
                message = f"request: not valid JSON ({err})"
            if message is not None:
                _answer(out, {"id": rid, "ok": False, "kind": "input", "message": message})
            else:
                traceback.print_exc(file=sys.stderr)
                tail = " | ".join(str(err).splitlines()[-2:])[-500:]
                _answer(out, {"id": rid, "ok": False, "kind": "crash",
                              "message": f"{type(err).__name__}: {tail}"})


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config_file", default="bundle/configs/inference.json",
                    help="inference config file(s), comma-separated (later ones override)")
    ap.add_argument("--ckpt_dir", default="bundle/models")
    ap.add_argument("--num_threads", type=int, default=0, help="torch CPU threads (0: the config's num_threads, 1 on CPU)")
    args = ap.parse_args(argv)
    # the protocol owns the real stdout; anything the product prints goes to stderr
    protocol = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    sys.stdout = sys.stderr
    files = [f for f in args.config_file.split(",") if f.strip()]
    try:
        worker = SynthesisWorker(files, args.ckpt_dir, num_threads=args.num_threads or None)
    except Exception as err:
        message = describe_error(err)
        if message is None:
            traceback.print_exc(file=sys.stderr)
            message = f"{type(err).__name__}: {err}"
        _answer(protocol, {"ready": False, "message": message})
        return 1
    _answer(protocol, {"ready": True, **worker.info})
    serve(worker, sys.stdin, protocol)
    return 0


if __name__ == "__main__":
    sys.exit(main())
