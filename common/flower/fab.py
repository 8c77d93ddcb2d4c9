"""The app bundle (FAB) of a folder, byte for byte what ``flwr build``/``flwr run`` make, without
walking the folder's virtual environment.

Flower 1.41 builds a FAB by listing *every* file under the app folder (``collect_files``: a
``Path.resolve()`` per file) and filtering afterwards (its include/exclude patterns, the app's
``fab-include``, ``.gitignore``). In a checkout the folder holds ``.venv`` (about 46 000 files
after ``make install``): each build took about 10 s of CPU on 2 cores, once for every
``medsynth simulate``, ``server start`` and ``server fab-hash``. Here the listing skips whole
folders whose files the filters would drop anyway, and Flower's own
``build_fab_from_files`` does the filtering and the zip, so the bytes, and so the SHA-256 that
hospitals pin, are Flower's. A folder is skipped when it is

* ignored as a folder by the app's ``.gitignore`` (only if that file has no ``!`` re-include
  pattern: Git cannot re-include below an ignored folder, pathspec would), or by Flower's own
  exclude patterns (``.venv/**``, ``**/__pycache__/**``, ``.flwr/**``), or
* outside every ``fab-include`` pattern's fixed leading folders (``server/**/*.py`` can only
  match below ``server/``), when every pattern has such a folder.

:func:`stage_app` writes the bundle's files into a fresh folder for ``flwr run``, which then
lists a few hundred files instead.
"""

from __future__ import annotations

import os
import shutil
import tomllib
from collections.abc import Iterable
from pathlib import Path

GLOB_CHARS = frozenset("*?[")


def _fixed_prefixes(patterns: Iterable[str]) -> list[tuple[str, ...]] | None:
    """The fixed leading folders of each pattern (``server/**/*.py`` → ``("server",)``); None when
    a pattern starts with a wildcard (then it may match anywhere)."""
    prefixes = []
    for pattern in patterns:
        parts = pattern.strip("/").split("/")[:-1]  # the last part names files
        fixed: list[str] = []
        for part in parts:
            if GLOB_CHARS & set(part):
                break
            fixed.append(part)
        if not fixed:
            return None
        prefixes.append(tuple(fixed))
    return prefixes


def _may_hold_included(rel: tuple[str, ...], prefixes: list[tuple[str, ...]] | None) -> bool:
    """Whether folder ``rel`` lies on the way to, or below, one of the fixed prefixes."""
    if prefixes is None:
        return True
    return any(p[: len(rel)] == rel or rel[: len(p)] == p for p in prefixes)


def app_files(root: Path) -> dict[str, Path]:
    """Relative POSIX path → file, as Flower's ``collect_files`` lists them, less whole folders the
    build would drop (module docstring). Symbolic links and files resolving outside ``root`` are
    left out, as Flower does."""
    from flwr.cli.utils import build_pathspec, load_gitignore_patterns
    from flwr.supercore.constant import APP_PUBLISH_EXCLUDE_PATTERNS

    root = root.expanduser().resolve()
    ignore = load_gitignore_patterns(root / ".gitignore")
    ignored = build_pathspec([] if any(p.startswith("!") for p in ignore) else ignore)
    excluded = build_pathspec(APP_PUBLISH_EXCLUDE_PATTERNS)
    with (root / "pyproject.toml").open("rb") as fh:
        app = tomllib.load(fh).get("tool", {}).get("flwr", {}).get("app", {})
    include = app.get("fab-include")
    prefixes = _fixed_prefixes(include) if isinstance(include, list) and include else None

    files: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        rel_dir = here.relative_to(root)
        keep = []
        for name in dirnames:
            rel = (rel_dir / name).as_posix()
            if ignored.match_file(rel + "/") or excluded.match_file(rel + "/x"):
                continue
            if not _may_hold_included((rel_dir / name).parts, prefixes):
                continue
            keep.append(name)
        dirnames[:] = keep
        for name in filenames:
            path = here / name
            if path.is_symlink() or not path.resolve().is_relative_to(root):
                continue
            files[(rel_dir / name).as_posix()] = path
    return files


def build_fab(root: Path) -> bytes:
    """The FAB of app folder ``root``: the bytes ``flwr build`` makes of it."""
    from flwr.cli.build import build_fab_from_files

    return build_fab_from_files(app_files(root))[0]


#: The staged copy's folder name. ``flwr run`` refuses an app folder whose name is not a letter
#: followed by letters, digits and hyphens (≤ 32), e.g. a ``mktemp -d`` checkout ``tmp.O8fdBcGmah``;
#: the FAB holds the files, not the folder's name, so staging under a fixed name lets any checkout run.
STAGED_APP_NAME = "medsynth"


def stage_app(root: Path, dest: Path) -> Path:
    """Copy the files of ``root``'s bundle into ``dest/STAGED_APP_NAME`` (made anew) and return that
    folder: ``flwr run`` of it builds the same FAB as of ``root``, from a few hundred files, whatever
    ``root`` itself is called."""
    from flwr.cli.utils import filter_paths_for_publish

    root = root.expanduser().resolve()
    staged = dest / STAGED_APP_NAME
    if staged.exists():
        shutil.rmtree(staged)
    files = app_files(root)
    for rel in filter_paths_for_publish(files):
        target = staged / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(files[rel], target)
    return staged
