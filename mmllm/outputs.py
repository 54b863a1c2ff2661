"""Where commands write: never over what mmllm did not write; over its own output only when asked, atomically.

Every output says what it is. A folder carries a marker file naming its kind (a prepared dataset:
`mmllm-prepared.json`, a checkpoint: `mmllm-checkpoint.json`, a pulled model: `mmllm-model.json`); an output
file is recognised by its content (`Kind.ours`). Before any work, `check` refuses in one line an output that
is or contains one of the command's inputs, a file where a folder is expected (or the reverse), an existing
output that is not mmllm's of the same kind, or one that is but `--overwrite` was not given. The new output
is written beside the old one (`beside`) and moved into place by `replace`: the old one is renamed aside, the
new one renamed in, then the old one deleted. An empty file or folder holds nothing to lose and is replaced.
While a command writes an output it holds `lock(out)`: a second run on the same output is refused.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import socket
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from mmllm.errors import UserError

HOST = socket.gethostname().replace("/", "_")
SMALL = 1 << 20  # JSON companions larger than this are not mmllm's


@dataclass(frozen=True)
class Kind:
    """What an output is: its name in messages, folder or file, and how mmllm recognises one of its own."""

    name: str  # "a prepared dataset"
    folder: bool
    ours: Callable[[Path], bool]  # called on an existing, non-empty path of the right type
    sign: str  # what `ours` looks for, for messages: "mmllm-prepared.json"
    writes: frozenset[str] | None = None  # a folder's entries mmllm writes; others block --overwrite (None: any)


def marked_folder(name: str, marker: str, also: Callable[[Path], bool] | None = None,
                  writes: Iterable[str] | None = None) -> Kind:
    """A folder kind recognised by its marker file (or by `also`, for folders written before markers)."""
    return Kind(name, True, lambda p: (p / marker).is_file() or bool(also and also(p)), marker,
                frozenset(writes) if writes is not None else None)


def check(out: str | Path, kind: Kind, inputs: Iterable[str | Path] = (), overwrite: bool = False,
          flag: str = "--output", advice: str = "choose another path") -> bool:
    """Refuse (UserError, one line) an output that must not be written; True when an existing one will be
    replaced (it is mmllm's own of this kind and `overwrite` is set), False when there is nothing to replace."""
    out = Path(out)
    for given in inputs:
        if str(given) == "-":
            continue
        relation = _relation(Path(given), out)
        if relation:
            raise UserError(f"{flag} {out} {relation} the input {given}: choose another path")
    if out.is_symlink() and not out.exists():
        raise UserError(f"{flag} {out} is a broken symbolic link: remove it or choose another path")
    if not out.exists():
        above = next(p for p in out.absolute().parents if p.exists())
        if not above.is_dir():
            raise UserError(f"{flag} {out}: {above} is a file, not a folder: choose another path")
        return False
    if kind.folder and not out.is_dir():
        raise UserError(f"{flag} {out} is a file; {kind.name} is a folder: choose another path")
    if not kind.folder and out.is_dir():
        raise UserError(f"{flag} {out} is a folder; {kind.name} is a file: choose another path")
    if not kind.folder and not out.is_file():
        raise UserError(f"{flag} {out} is not a regular file (a device or pipe?): choose another path")
    if _empty(out):
        return False
    if not kind.ours(out):
        raise UserError(f"{flag} {out} already exists and is not {kind.name} written by mmllm (no {kind.sign}): "
                        f"{advice}; mmllm never replaces what it did not write")
    if not overwrite:
        raise UserError(f"{flag} {out} already holds {kind.name}: add --overwrite to replace it, "
                        "or choose another path")
    foreign = sorted(e.name for e in out.iterdir() if e.name not in kind.writes) if kind.writes is not None else []
    if foreign:
        raise UserError(f"{flag} {out} holds {kind.name} and also files mmllm did not write ({', '.join(foreign[:5])}"
                        f"{', ...' if len(foreign) > 5 else ''}): move them away first; --overwrite never deletes them")
    return True


def _relation(given: Path, out: Path) -> str:
    """'is' when `out` is the input `given`, 'contains' when the input lies inside `out`, else ''."""
    a, b = given.resolve(), out.resolve()
    if a == b or (a.exists() and b.exists() and os.path.samefile(a, b)):
        return "is"
    return "contains" if b in a.parents else ""


def _empty(path: Path) -> bool:
    if path.is_dir():
        return next(path.iterdir(), None) is None
    return path.stat().st_size == 0


def real(out: Path) -> Path:
    """The path written: a symbolic link's target (so the link keeps pointing at the new output)."""
    return out.resolve() if out.is_symlink() else out


def beside(out: str | Path, folder: bool = False) -> Path:
    """A fresh temporary path next to `out` (a new empty folder when `folder`), after removing the ones that
    killed runs of this machine left behind."""
    out = real(Path(out))
    out.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{out.name}.tmp-"
    for stale in out.parent.glob(glob.escape(prefix) + "*"):
        host, _, pid = stale.name[len(prefix):].rpartition("-")
        if host in ("", HOST) and pid.isdigit() and not _alive(int(pid)):
            _remove(stale)
    tmp = out.parent / f"{prefix}{HOST}-{os.getpid()}"
    _remove(tmp)
    if folder:
        tmp.mkdir()
    return tmp


def replace(new: Path, out: str | Path, kind: Kind | None = None, overwrite: bool = True) -> None:
    """Move the finished `new` onto `out`: the old output (if any) is renamed aside, `new` renamed in, then the
    old one deleted. With `kind`, `out` is checked again first (something may have appeared there meanwhile):
    refused unless it is mmllm's of this kind and `overwrite` (the command's --overwrite) allows replacing it."""
    out = real(Path(out))
    if kind is not None and out.exists() and not _empty(out) and not (overwrite and kind.ours(out)):
        _remove(new)
        what = f"is {kind.name} written by another run (--overwrite was not given)" if kind.ours(out) \
            else f"is not {kind.name}"
        raise UserError(f"{out} appeared while mmllm was writing and {what}: left untouched; "
                        f"the new output was not saved")
    if not out.exists():
        os.replace(new, out)
        return
    old = out.parent / f".{out.name}.old-{HOST}-{os.getpid()}"
    _remove(old)
    os.replace(out, old)
    try:
        os.replace(new, out)
    except BaseException:
        os.replace(old, out)
        raise
    _remove(old)


@contextmanager
def atomic_file(out: str | Path) -> Iterator[Path]:
    """A temporary path beside `out` to write; moved onto `out` when the block succeeds, removed if it fails."""
    tmp = beside(out)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    replace(tmp, out)


@contextmanager
def lock(out: str | Path, flag: str = "--output") -> Iterator[None]:
    """Hold `.NAME.lock` beside `out` while a command writes it: a second mmllm run on the same output is refused
    in one line (a lock left by a killed run of this machine is taken over)."""
    out = real(Path(out))
    out.parent.mkdir(parents=True, exist_ok=True)
    path = out.parent / f".{out.name}.lock"
    mine = f"{HOST}-{os.getpid()}"
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = path.read_text(encoding="utf-8").strip()
            except OSError:
                continue  # released meanwhile
            host, _, pid = holder.rpartition("-")
            if host == HOST and pid.isdigit() and not _alive(int(pid)):
                path.unlink(missing_ok=True)  # its run was killed
                continue
            raise UserError(f"{flag} {out} is being written by another mmllm run (process {pid or '?'} on "
                            f"{host or 'an unknown machine'}, lock file {path}): wait for it to finish or choose "
                            "another path; if no such run is alive, delete the lock file") from None
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(mine)
        break
    else:
        raise UserError(f"{flag} {out}: could not take the lock file {path}: delete it if no mmllm run is "
                        "writing there")
    try:
        yield
    finally:
        try:
            if path.read_text(encoding="utf-8").strip() == mine:
                path.unlink()
        except OSError:
            pass


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False


# ---------------------------------------------------------------- output files of eval / predict

def config_path(out: str | Path) -> Path:
    """The resolved config written beside an output file: `preds.jsonl` -> `preds.config.json`."""
    return Path(out).with_suffix(".config.json")


def _json_object(path: Path) -> dict | None:
    if path.stat().st_size > SMALL:
        return None
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def _is_eval_result(path: Path) -> bool:
    obj = _json_object(path)
    return obj is not None and {"task", "checkpoint", "split", "n"} <= set(obj)


def _is_resolved_config(path: Path) -> bool:
    obj = _json_object(path)
    return obj is not None and {"checkpoint", "output"} <= set(obj)


def _is_predictions(path: Path) -> bool:
    """JSON lines, each an object with an id and a prediction, a generated text or an error."""
    try:
        with open(path, "rb") as f:
            for line in f:
                if not line.strip():
                    continue
                obj = json.loads(line)
                if not (isinstance(obj, dict) and "id" in obj and {"prediction", "generated", "error"} & set(obj)):
                    return False
    except (OSError, ValueError):
        return False
    return True


def _is_mmllm_png(path: Path) -> bool:
    """A PNG whose 'Software' text names mmllm (or matplotlib: written by an mmllm before these markers)."""
    try:
        from PIL import Image

        with Image.open(path) as im:
            software = str(getattr(im, "text", {}).get("Software", ""))
    except Exception:  # noqa: BLE001 - not an image at all
        return False
    return software.startswith(("mmllm", "Matplotlib"))


EVAL_RESULT = Kind("an eval result", False, _is_eval_result, "the keys task, checkpoint, split, n")
PREDICTIONS = Kind("predictions", False, _is_predictions, "one JSON object with an id per line")
RESOLVED_CONFIG = Kind("a resolved config", False, _is_resolved_config, "the keys checkpoint, output")
PLOT = Kind("a plot", False, _is_mmllm_png, "PNG text Software: mmllm")
PNG_INFO = {"Software": "mmllm"}  # savefig(..., metadata=PNG_INFO): how PLOT recognises mmllm's plots
