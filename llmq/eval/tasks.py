"""Downstream tasks (hellaswag, arc_easy, ...) through EleutherAI's lm-evaluation-harness (PyPI `lm-eval`, an
optional dependency), on the model as llmq evaluates it: an llmq checkpoint runs packed, through llmq.load.

lm-eval fetches each task's data from the Hugging Face hub. Offline, a task of your own (a YAML file naming a
local JSON file, lm-eval's task format) is read from `task_dir`.
"""

from __future__ import annotations

from pathlib import Path

from llmq.core.errors import LlmqError, reason


def require_lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise LlmqError("--tasks needs EleutherAI's lm-evaluation-harness: pip install 'llmq[eval]' "
                        "(or pip install lm-eval)") from None
    return lm_eval, HFLM, TaskManager


def run_tasks(model, tokenizer, tasks: list[str], limit: int | None = None, task_dir: str | Path | None = None,
              device: str = "cpu", batch_size: int = 1) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} (acc, acc_norm, ... and their standard errors as `<metric>_stderr`) of lm-eval's
    zero-shot run of each task on `model`; `limit` documents per task (None: all)."""
    lm_eval, HFLM, TaskManager = require_lm_eval()
    if task_dir is not None and not Path(task_dir).is_dir():
        raise LlmqError(f"--task-dir {task_dir} is not a directory; pass the folder holding your task YAML files")
    manager = TaskManager(include_path=None if task_dir is None else str(task_dir))
    unknown = [task for task in tasks if task not in manager.all_tasks]
    if unknown:
        raise LlmqError(f"lm-eval has no task {', '.join(unknown)}; `lm-eval ls tasks` lists them, or pass "
                        "--task-dir DIR with your own task YAML")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, device=device, batch_size=batch_size)
    try:
        output = lm_eval.simple_evaluate(model=lm, tasks=tasks, limit=limit, task_manager=manager, log_samples=False)
    except (OSError, ConnectionError, ValueError) as error:  # mostly: the task's data is on an unreachable hub
        raise LlmqError(f"lm-eval could not run {', '.join(tasks)} ({reason(error)}); offline, pass --task-dir with "
                        "a task whose data is a local file") from None
    results = {}
    for task, metrics in output["results"].items():
        values = {}
        for key, value in metrics.items():  # lm-eval's keys are "<metric>,<filter>", e.g. "acc,none"
            name = key.partition(",")[0]
            if isinstance(value, (int, float)) and not isinstance(value, bool) and name != "sample_len":
                values[name] = float(value)
        results[task] = values
    return results
