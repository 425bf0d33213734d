"""Outputs appear only when complete, and --overwrite replaces only what llmq itself wrote.

- A run stages its output in a fresh, private directory beside the target (`.NAME.partial-PID-NONCE`, holding
  `.llmq-stage`: the process's id, its start time and the random nonce of the name) and renames it into place
  only when complete; a failed or interrupted run (Ctrl-C, SIGTERM) removes it. A run killed outright (SIGKILL)
  cannot; the next run for the same output removes what it left before any work starts, once the stage's own
  record says llmq made it (nonce and name agree) and its process is gone (no process of that id, or one that
  started at another time: the id was reused). Anything else with such a name is left alone.
- `--overwrite` replaces only an llmq output: a directory whose marker file (`llmq.json`) lists every file in it
  (llmq writes the list when the output is complete; a foreign file added since is named and refused), or a
  GGUF file. Never a directory holding the input model, never anything else: that is refused in one line.
- Nothing is written through an existing file or symbolic link: staged files are new (O_EXCL) in a private
  directory, and renames replace a name, never what a link points to.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from llmq.core import __version__, log
from llmq.core.errors import LlmqError

MARKER = "llmq.json"  # in every directory llmq writes; what --overwrite recognises
STAGE_RECORD = ".llmq-stage"  # in every staging directory: who made it (see the module's docstring)
GGUF_MAGIC = b"GGUF"
_STAGED = re.compile(r"^\.(?P<name>.+)\.(?:partial|old)-(?P<pid>\d+)-(?P<nonce>[0-9a-f]{16})$")


def write_marker(directory: Path, **fields) -> None:
    (directory / MARKER).write_text(json.dumps({"written_by": "llmq", "version": __version__, **fields}, indent=2) + "\n")


def _list_files(directory: Path) -> None:
    """Record in the marker every file of a complete output (what a later --overwrite may delete)."""
    marker = directory / MARKER
    if not marker.is_file():
        return
    fields = json.loads(marker.read_text())
    fields["files"] = sorted(str(p.relative_to(directory)) for p in directory.rglob("*")
                             if not p.is_dir() and p != marker)
    marker.write_text(json.dumps(fields, indent=2) + "\n")


def foreign_files(path: Path) -> list[str] | None:
    """For a directory llmq wrote: the files in it that its marker does not list ([] when none); None when it is
    not an llmq output (no marker, a marker that is not llmq's or lists no files: written by hand or by hand-edit)."""
    marker = path / MARKER
    if path.is_symlink() or not path.is_dir() or marker.is_symlink() or not marker.is_file():
        return None
    try:
        fields = json.loads(marker.read_text())
        listed = set(fields["files"]) if fields.get("written_by") == "llmq" else None
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        return None
    if listed is None or not all(isinstance(name, str) for name in listed):
        return None
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")
                  if not p.is_dir() and p != marker and str(p.relative_to(path)) not in listed)


def is_llmq_output(path: Path) -> bool:
    """A directory whose marker lists every file in it, or a GGUF file (what --overwrite may replace)."""
    if path.is_symlink():
        return False
    if path.is_dir():
        return foreign_files(path) == []
    if path.is_file() and path.suffix == ".gguf":
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    return False


def _inside(path: Path, directory: Path) -> bool:
    path, directory = path.resolve(), directory.resolve()
    return path == directory or directory in path.parents


def _start_time(pid: int) -> str | None:
    """When process `pid` started (Linux: clock ticks since boot, /proc/PID/stat field 22), None if unknown: with
    the pid, what tells a live run from an unrelated process that got its id later."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[19]


def _same_process(pid: int, started: str | None) -> bool:
    """Whether live process `pid` is the one that recorded `started`; when either start time is unknown, assume it
    is (never delete a live run's stage)."""
    now = _start_time(pid)
    return started is None or now is None or now == started


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _stage_record(entry: Path, match: re.Match) -> dict | None:
    """The record llmq left in a staging directory, if this is one llmq made (its nonce and pid are the name's)."""
    record = entry / STAGE_RECORD
    if entry.is_symlink() or not entry.is_dir() or record.is_symlink() or not record.is_file():
        return None
    try:
        fields = json.loads(record.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(fields, dict) or (fields.get("nonce"), fields.get("pid")) != (match["nonce"], int(match["pid"])):
        return None
    return fields


_LEFT_ALONE: set[Path] = set()


def remove_stale_stages(target: Path) -> None:
    """Remove what killed llmq runs left while staging `target`; refuse if a live run is writing it now. Only
    directories whose own record says llmq made them are touched."""
    parent = target.parent
    if not parent.is_dir():
        return
    for entry in parent.iterdir():
        match = _STAGED.match(entry.name)
        if match is None or match["name"] != target.name or int(match["pid"]) == os.getpid():
            continue
        record = _stage_record(entry, match)
        if record is None:
            if entry not in _LEFT_ALONE:  # said once: the output is checked again when it is staged
                _LEFT_ALONE.add(entry)
                log.info(f"llmq: left {entry.name} alone: it is named like a staging directory but llmq did not make it")
            continue
        pid = int(match["pid"])
        if _pid_alive(pid) and _same_process(pid, record.get("started")):
            raise LlmqError(f"another llmq run (process {pid}) is writing {target}; wait for it or choose another --out")
        shutil.rmtree(entry, ignore_errors=True)
        log.info(f"llmq: removed {entry.name}, left by an interrupted run")


@dataclass(frozen=True)
class OutputKind:
    directory: bool  # True: a model directory; False: one file
    side_files: tuple[str, ...] = ()  # names written beside a file output as `<stem>.<name>`


def side_paths(target: Path, kind: OutputKind) -> list[Path]:
    return [target.with_name(f"{target.stem}.{name}") for name in kind.side_files]


def check_output(target: str | os.PathLike, overwrite: bool, kind: OutputKind,
                 inputs: tuple[Path, ...] = ()) -> None:
    """Refuse, before any work, an output that cannot or must not be written; clean what killed runs left."""
    target = Path(target)
    longest = _name_max(target.parent) - len(f"..partial-{os.getpid()}-{'x' * 16}.tensors")  # the staging names
    if len(target.name.encode()) > longest:
        raise LlmqError(f"--out {target.name[:40]}... is {len(target.name.encode())} bytes long; names of at most "
                        f"{longest} fit here (llmq stages the output under a longer temporary name)")
    ancestor = next(p for p in (target.parent, *target.parent.parents) if os.path.lexists(p) or p == Path(p.anchor))
    if not ancestor.is_dir():
        raise LlmqError(f"--out {target} is inside {ancestor}, which is a file; choose another --out")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise LlmqError(f"cannot write into {ancestor} (permission denied); choose another --out")
    for source in inputs:
        if _inside(target, source):
            raise LlmqError(f"--out {target} is inside the input model's directory {source}; llmq never writes into "
                            "its input: choose an --out outside it")
    for path in (target, *side_paths(target, kind)):
        _check_existing(path, overwrite, kind if path == target else OutputKind(directory=False), inputs)
    remove_stale_stages(target)


def _name_max(directory: Path) -> int:
    """The longest file name the file system holding `directory` (or its nearest existing ancestor) takes."""
    existing = next((p for p in (directory, *directory.parents) if p.is_dir()), Path("/"))
    try:
        return os.pathconf(existing, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def _check_existing(path: Path, overwrite: bool, kind: OutputKind, inputs: tuple[Path, ...]) -> None:
    if not os.path.lexists(path):
        return
    if path.is_symlink():
        raise LlmqError(f"--out {path} is a symbolic link; llmq does not write through links: name the real path")
    if kind.directory and not path.is_dir():
        raise LlmqError(f"--out {path} is a file, but this format writes a directory; choose another --out")
    if not kind.directory and path.is_dir():
        raise LlmqError(f"--out {path} is a directory, but this output is one file; choose another --out")
    if path.is_dir() and not any(path.iterdir()):
        return  # an empty directory is free
    if not overwrite:
        raise LlmqError(f"output {path} already exists; choose another --out or pass --overwrite")
    for source in inputs:
        if _inside(source, path):
            raise LlmqError(f"--overwrite would delete {path}, which holds the input model {source}; choose another --out")
    if path.is_dir() and (foreign := foreign_files(path)):
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise LlmqError(f"--overwrite replaces only what llmq wrote, and {path} also holds {shown}; move "
                        f"{'them' if len(foreign) > 1 else 'it'} out or choose another --out")
    if path.suffix == ".gguf" or path.is_dir():
        if not is_llmq_output(path):
            raise LlmqError(f"--overwrite replaces only what llmq wrote (a directory whose {MARKER} lists its files, "
                            f"or a .gguf file); {path} is neither: choose another --out")


def _stage_directory(target: Path, kind: str = "partial") -> Path:
    """A new private directory beside `target` named `.NAME.KIND-PID-NONCE`, holding its record (STAGE_RECORD)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    pid = os.getpid()
    while True:
        nonce = secrets.token_hex(8)
        stage = target.parent / f".{target.name}.{kind}-{pid}-{nonce}"
        try:
            stage.mkdir(mode=0o700)
            break
        except FileExistsError:
            continue
    (stage / STAGE_RECORD).write_text(json.dumps({"nonce": nonce, "pid": pid, "started": _start_time(pid)}) + "\n")
    return stage


def _replace(source: Path, target: Path) -> None:
    """Move `source` to `target`; an existing target (already checked: ours, or --overwrite) goes away after."""
    if target.is_dir() and not target.is_symlink():
        old = _stage_directory(target, "old")
        os.replace(target, old / "previous")
        os.replace(source, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(source, target)


@contextlib.contextmanager
def atomic_output_dir(target: str | os.PathLike, overwrite: bool = False):
    """Yield a fresh private directory; on success it replaces `target`, on failure it is removed."""
    target = Path(target)
    check_output(target, overwrite, OutputKind(directory=True))
    tmp = _stage_directory(target)
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result should look like any other directory
    try:
        yield tmp
        (tmp / STAGE_RECORD).unlink()
        _list_files(tmp)
        for written in tmp.rglob("*"):  # some writers (safetensors) make files 0600: give them the umask's mode
            if written.is_file() and not written.is_symlink():
                written.chmod(0o666 & ~umask)
        _replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_output_file(target: str | os.PathLike, overwrite: bool = False, side_files: tuple[str, ...] = ()):
    """Yield (the staged file's path, the staging directory); on success the file replaces `target` and every other
    file left in the staging directory goes beside it as `<stem>.<name>`; on failure all of it is removed."""
    target = Path(target)
    kind = OutputKind(directory=False, side_files=side_files)
    check_output(target, overwrite, kind)
    stage = _stage_directory(target)
    try:
        staged = stage / target.name
        yield staged, stage
        os.chmod(staged, 0o644)  # files in a private directory: make the result look like any other file
        (stage / STAGE_RECORD).unlink()
        for side in sorted(stage.iterdir()):
            if side != staged:
                os.chmod(side, 0o644)
                os.replace(side, target.with_name(f"{target.stem}.{side.name}"))
        os.replace(staged, target)
        stage.rmdir()
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def write_new_file(path: Path, text: str) -> None:
    """Replace `path` by a file holding `text`: written under a fresh name (never an existing file or link), then
    renamed over it; a symbolic link at `path` is refused, not followed."""
    if path.is_symlink():
        raise LlmqError(f"{path} is a symbolic link; llmq does not write through links")
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(name, 0o644)
        os.replace(name, path)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
