"""Run plumbing shared by every script: one-line user errors, validated flags, atomic writes, JSON
files, output locks, manifests and the cache folder.

Nothing here knows about models or persona diffs; the weight-space math lives in lora_utils.py
and model loading in model_loading.py.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import math
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterable, Iterator

PACKAGES_IN_MANIFESTS = ("torch", "transformers", "peft", "accelerate")


class PersonaLoRAError(Exception):
    """A problem with the user's input: the message names the file or flag and the fix."""


# ---------------------------------------------------------------------------------------------
# The command line: one line per error, exit status 2, before any model is loaded
# ---------------------------------------------------------------------------------------------


class ArgumentParser(argparse.ArgumentParser):
    """argparse with its errors on one line (argparse prints the whole usage first)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def _number(text: str, kind, low: float | None, high: float | None, low_open: bool = False):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number")
    if low is not None and (value <= low if low_open else value < low):
        raise argparse.ArgumentTypeError(f"must be {'>' if low_open else '≥'} {low:g}, got {text}")
    if high is not None and value > high:
        raise argparse.ArgumentTypeError(f"must be ≤ {high:g}, got {text}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer ≥ 1."""
    return _number(text, int, 1, None)


def non_negative_int(text: str) -> int:
    return _number(text, int, 0, None)


def finite_float(text: str) -> float:
    """argparse type: any finite number (NaN and ±inf are refused)."""
    return _number(text, float, None, None)


def positive_float(text: str) -> float:
    return _number(text, float, 0, None, low_open=True)


def non_negative_float(text: str) -> float:
    return _number(text, float, 0, None)


def unit_interval(text: str) -> float:
    """argparse type: a number in (0, 1], e.g. top_p."""
    return _number(text, float, 0, 1, low_open=True)


def run_cli(main) -> None:
    """Run a script's main(): a PersonaLoRAError becomes one clear line and exit status 2, an
    interrupt a line that says the run resumes."""
    try:
        main()
    except PersonaLoRAError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: finished work is kept, run the same command again to resume", file=sys.stderr)
        sys.exit(130)


# ---------------------------------------------------------------------------------------------
# Files: atomic writes, stale temporaries, writability, JSON
# ---------------------------------------------------------------------------------------------

_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)-[^/]+$")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_temporary(path: str | os.PathLike) -> bool:
    """Whether `path` is (inside) a temporary folder of atomic_path: never a finished output."""
    return any(_TEMP_NAME.match(part) for part in Path(path).parts)


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete temporaries that atomic_path left in `folder` when its process was killed (their
    names carry the writer's pid, so a live writer's temporary is never touched)."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        match = _TEMP_NAME.match(entry.name)
        if match and not _process_alive(int(match["pid"])):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the body succeeds.

    Works for files and folders, so a crash never leaves a half-written output behind; what a
    killed run left (`.NAME.tmp-PID-*`) is removed by the next write beside it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent)) / path.name
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)


def check_writable(path: str | os.PathLike, flag: str) -> Path:
    """Refuse, before any work, an output path that cannot be written (a parent that is a file,
    a read-only file system, no permission). Creates the parent folder."""
    path = Path(path)
    if path.is_dir():
        raise PersonaLoRAError(f"{flag} {path} is a folder; give a file path")
    blocking_file = next((parent for parent in path.parents if parent.exists() and not parent.is_dir()), None)
    if blocking_file is not None:
        raise PersonaLoRAError(f"{flag} {path}: {blocking_file} is a file, not a folder; choose another location")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.probe-"):
            pass
    except OSError as error:
        raise PersonaLoRAError(f"{flag} {path}: cannot write there ({error.strerror or error}); choose another location") from None
    return path


def check_writable_dir(folder: str | os.PathLike, flag: str) -> Path:
    """Like check_writable for an output folder."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise PersonaLoRAError(f"{flag} {folder} is a file, not a folder")
    check_writable(folder / "probe", flag)
    return folder


def write_json(path: str | os.PathLike, data) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> None:
    with atomic_path(path) as tmp:
        with tmp.open("w") as handle:
            for record in records:
                handle.write(json.dumps(record) + "\n")


def file_identity(path: str | os.PathLike) -> dict:
    """What a cached result depends on when it depends on a file: its content, not its timestamp
    (a rerun that rewrites an identical file must not invalidate finished work)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return {"path": str(path), "sha256": digest.hexdigest()}


def read_json_object(path: str | os.PathLike, what: str = "file") -> dict:
    """A JSON object from `path`, or a PersonaLoRAError naming the file and what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise PersonaLoRAError(f"{what} not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise PersonaLoRAError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise PersonaLoRAError(f"{path} must hold a JSON object")
    return data


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise PersonaLoRAError(f"file not found: {path}")
    records = []
    with path.open() as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise PersonaLoRAError(f"{path}:{number} is not valid JSON ({error.msg})") from None
    return records


# ---------------------------------------------------------------------------------------------
# One writer per output
# ---------------------------------------------------------------------------------------------


class OutputLock:
    """An exclusive lock on an output (a file `.NAME.lock` beside it), held for a whole run.

    Two runs writing the same output would share its work files and the last writer would win
    silently; the second is refused with one line instead. The lock is released when the process
    ends, however it ends (flock), so a killed run never blocks the next one.
    """

    def __init__(self, output: str | os.PathLike, flag: str):
        self.output, self.flag = Path(output), flag
        self.path = self.output.parent / f".{self.output.name}.lock"
        self.handle = None

    def __enter__(self) -> "OutputLock":
        if self.handle is not None:  # already held by this object: entering again is a no-op
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = open(self.path, "a+")
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.handle.seek(0)
            holder = self.handle.read().strip() or "another process"
            self.handle.close()
            self.handle = None
            raise PersonaLoRAError(f"{self.flag} {self.output} is being written by another run ({holder}); "
                                   "wait for it to finish or choose another output") from None
        self.handle.seek(0)
        self.handle.truncate()
        self.handle.write(f"pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}")
        self.handle.flush()
        return self

    def __exit__(self, *exc_info) -> None:
        if self.handle is not None:
            self.handle.close()  # closing releases the flock
            self.handle = None
            with contextlib.suppress(OSError):
                self.path.unlink()


# ---------------------------------------------------------------------------------------------
# How an output was made
# ---------------------------------------------------------------------------------------------


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES_IN_MANIFESTS:
        module = sys.modules.get(name)
        if module is None:
            with contextlib.suppress(ImportError):
                module = __import__(name)
        versions[name] = getattr(module, "__version__", "not installed")
    return versions


class StageClock:
    """Seconds and units of work (tokens, items, answers) per named stage of this process: every
    manifest written after them records them, and scripts/stage_times.py prints the breakdown
    of a run (the demo's, at its end). A stage whose results were reused records its few
    milliseconds, so a resumed run shows what it did not redo."""

    def __init__(self):
        self.stages: list[dict] = []
        self._open: list[dict] = []

    @contextlib.contextmanager
    def stage(self, name: str, unit: str | None = None) -> Iterator[dict]:
        """with STAGES.stage("generating pos", "tokens") as work: ... work["count"] += n
        A stage opened inside another (a judge's model loading while it scores) names it in
        "within": its seconds are part of the outer stage's, not to be added to them."""
        work = {"stage": name, "seconds": 0.0, "unit": unit, "count": 0, "started": time.time()}
        if self._open:
            work["within"] = self._open[-1]["stage"]
        self._open.append(work)
        started = time.perf_counter()
        try:
            yield work
        finally:
            work["seconds"] = round(time.perf_counter() - started, 3)
            self._open.remove(work)
            self.stages.append(work)


STAGES = StageClock()  # this process's stages; write_manifest records them


def write_manifest(output_dir: str | os.PathLike, arguments, started_at: float, name: str = "manifest.json", **extra) -> Path:
    """Record how an output was made: arguments, versions, machine, timings, and stage extras."""
    import torch  # here, not at the top: the plumbing loads in milliseconds without it

    arguments = vars(arguments) if hasattr(arguments, "__dict__") else dict(arguments)
    manifest = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "arguments": arguments,
        "versions": package_versions(),
        "machine": {
            "platform": platform.platform(),
            "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
            "torch_threads": torch.get_num_threads(),
        },
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started_at)),
        "seconds": round(time.time() - started_at, 2),
        # This run's stages only: a notebook or a test runs several stage scripts in one process.
        "stages": [s for s in STAGES.stages if s["started"] >= started_at],
        **extra,
    }
    path = Path(output_dir) / name
    write_json(path, manifest)
    return path


def cache_dir() -> Path:
    """The user cache folder: converted models, the CPU dtype probe, the judge cache."""
    root = os.environ.get("PERSONA_LORAS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "persona_loras"
    )
    return Path(root)
