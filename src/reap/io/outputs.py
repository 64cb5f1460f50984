"""What an existing ``--out`` holds, and whether reap may replace it.

* :func:`check_output_dir`: an output that is, holds or lies inside an input, or exists non-empty, is refused;
  with ``--overwrite`` an existing one is replaced only if reap wrote everything in it (:func:`foreign_entries`).
* :func:`check_still_replaceable`: the same question asked again just before publishing (by
  :func:`reap.io.staging.atomic_directory`), on the target and on the old folder renamed aside.
* :func:`reap_report`, :func:`output_files`: reap's own report in a folder, and the file list an output records.

What ``--overwrite`` may replace: an empty folder, or a previous reap output: a folder whose ``reap_report.json`` is
reap's (a JSON object with ``"tool": "reap"`` and its ``layers``) and every file of which reap wrote: a file the
report's ``files`` list names (every file of the output, listed when it was published), or one that ``reap report``
writes into a pruned folder later (the pictures, the summary, the card). Anything else (a file the list does not
name, a symbolic link, a folder holding none of reap's files, an empty folder reap did not make) is the user's, and
the whole output is refused, naming it: reap never deletes a file it did not write. A report of a reap before the
``files`` list: its fixed names, the shards its index names, and the files the source it names holds at the same
path (the tokenizer and side files it copied). The check runs when the options are checked, again under the lock,
and again on the old folder itself after it was renamed away from ``--out`` (so nothing can be added to it through
that name any more), before the new output takes its place; only then is the old one deleted.

Writing the output (locks, staging folders, free space, side files) is :mod:`reap.io.staging`'s.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from reap.core.errors import UserError
from reap.core.names import CARD_NAME, GENERATED, REPORT_NAME, STATS_NAME

#: the owner record of a staging folder (:mod:`reap.io.staging`): never a file of an output
OWNER_NAME = ".reap-staging.json"


def check_output_dir(out: Path, inputs: Iterable[Path], overwrite: bool) -> Path:
    """Refuse an output that is, or is inside, or contains an input, or exists non-empty: without ``overwrite``
    always, with it unless reap wrote everything in it (:func:`foreign_entries`; the module docstring says the rule)."""
    out = Path(out).expanduser().resolve()
    for src in inputs:
        src = Path(src).resolve()
        if out == src or src in out.parents:
            raise UserError(f"--out {out} is the input model directory or inside it; choose a directory elsewhere")
        if out in src.parents:
            raise UserError(f"--out {out} contains the input model {src}; choose a directory that does not")
    if out.exists():
        if not out.is_dir():
            raise UserError(f"--out {out} exists and is a file; choose a new directory")
        if any(out.iterdir()):
            foreign = foreign_entries(out)
            if foreign:
                raise UserError(
                    f"--out {out}{_cwd_note(out)} holds files reap did not write ({_listing(foreign)}); reap replaces "
                    "only its own output or an empty folder, even with --overwrite: choose another --out or remove them")
            if not overwrite:
                raise UserError(f"--out {out} exists and is not empty (a previous reap output); choose a new directory "
                                "or pass --overwrite to replace it")
    if not out.parent.exists():
        raise UserError(f"the parent of --out ({out.parent}) does not exist; create it first")
    return out


def _cwd_note(path: Path) -> str:
    try:
        return " (the current directory)" if Path.cwd().resolve() == path else ""
    except OSError:  # the current directory was deleted
        return ""


def _listing(names: list[str], most: int = 6) -> str:
    shown = ", ".join(names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def check_still_replaceable(folder: Path, target: Path, overwrite: bool) -> None:
    """UserError unless ``folder`` (the target, or the target renamed aside) is absent, empty, or with
    ``overwrite`` reap's own output: something may have been written there since --out was checked."""
    if not folder.exists() and not folder.is_symlink():
        return
    if folder.is_dir() and not folder.is_symlink() and not any(folder.iterdir()):
        return
    if not overwrite:
        raise UserError(f"--out {target} appeared while reap was writing it (another program wrote it); "
                        "nothing was published: choose another --out or pass --overwrite")
    if folder.is_symlink() or not folder.is_dir():
        raise UserError(f"--out {target} became a file or a link while reap was writing it; nothing was published and "
                        "nothing deleted: choose another --out")
    found = foreign_entries(folder)
    if found:
        raise UserError(f"--out {target} changed while reap was writing it: it holds files reap did not write "
                        f"({_listing(found)}); nothing was published and nothing deleted: choose another --out or "
                        "remove them")


# -- what --overwrite may replace -------------------------------------------------------------------------------
def reap_report(folder: Path) -> dict[str, Any] | None:
    """``folder``'s ``reap_report.json`` if reap wrote it (a regular file holding a JSON object with
    ``"tool": "reap"`` and a ``layers`` object), else None."""
    path = Path(folder) / REPORT_NAME
    if path.is_symlink() or not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("tool") != "reap" or not isinstance(data.get("layers"), dict):
        return None
    return data


def output_files(folder: Path) -> list[str]:
    """Every file under ``folder`` (relative POSIX paths, sorted), the staging owner record left out: what a pruned
    output records as its ``files`` in ``reap_report.json``."""
    return sorted(p.relative_to(folder).as_posix() for p in Path(folder).rglob("*")
                  if p.is_file() and p.name != OWNER_NAME)


class _Owned:
    """Which paths of a previous output reap wrote, from its report (see the module docstring)."""

    def __init__(self, folder: Path, report: Mapping[str, Any]):
        later = {REPORT_NAME, CARD_NAME, *GENERATED}  # what `reap report DIR` (re)writes into a pruned folder
        files = report.get("files")
        self.source: Path | None = None
        if isinstance(files, list) and all(isinstance(f, str) for f in files):
            self.files = later | set(files)
        else:  # a reap before the list: the names it always writes, the shards its index names, copies of the source
            self.files = later | {"config.json", "model.safetensors.index.json", "hf_quant_config.json", STATS_NAME}
            try:
                weight_map = json.loads((folder / "model.safetensors.index.json").read_text(encoding="utf-8"))["weight_map"]
                self.files |= {v for v in weight_map.values() if isinstance(v, str)}
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                pass
            source = report.get("source")
            if isinstance(source, str) and source and Path(source).is_dir():
                self.source = Path(source)
        self.dirs = {"/".join(parts[:i]) for f in self.files for parts in [f.split("/")] for i in range(1, len(parts))}

    def file(self, rel: str) -> bool:
        return rel in self.files or (self.source is not None and (self.source / rel).is_file()
                                     and not (self.source / rel).is_symlink())

    def may_hold(self, rel: str) -> bool:
        return rel in self.dirs or (self.source is not None and (self.source / rel).is_dir())


def foreign_entries(folder: Path) -> list[str]:
    """What in ``folder`` reap did not write (relative paths, folders with a trailing ``/``): [] for an empty folder
    or a previous reap output, which ``--overwrite`` may replace; everything in it when it has no reap report. A
    folder holding none of reap's files is named as a whole, symbolic links are never reap's."""
    folder = Path(folder)
    report = reap_report(folder)
    if report is None:
        return sorted(e.name + ("/" if e.is_dir(follow_symlinks=False) else "") for e in os.scandir(folder))
    owned = _Owned(folder, report)
    found: list[str] = []

    def visit(path: str, prefix: str) -> bool:
        """Add the foreign entries under path to found; whether it holds any of reap's files."""
        own = False
        for entry in sorted(os.scandir(path), key=lambda e: e.name):
            rel = prefix + entry.name
            if entry.is_dir(follow_symlinks=False):
                if owned.may_hold(rel):
                    mark = len(found)
                    if visit(entry.path, rel + "/"):
                        own = True
                        continue
                    del found[mark:]  # none of reap's files in it: named as a whole
                found.append(rel + "/")
            elif entry.is_file(follow_symlinks=False) and owned.file(rel):
                own = True
            else:
                found.append(rel)
        return own

    visit(str(folder), "")
    return found
