"""The documentation a newcomer follows: short README, links that resolve, commands that exist.

Every ``make <target>``, ``medsynth ...`` command line (with its flags) and ``python -m module``
named in README.md or docs/*.md must exist; every relative link must reach a file (and a heading,
when it names one); the tables that restate the code (rejection reasons, run keys) must list
exactly what the code has.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import re
import shlex
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from common.dicom.errors import REJECTION_REASONS

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
README_LIMIT_BYTES = 10_240

_FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.M | re.S)
_INLINE_CODE = re.compile(r"`([^`\n]+)`")
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _rel(page: Path) -> str:
    return str(page.relative_to(ROOT))


def _code_lines(text: str) -> Iterator[str]:
    """Lines of fenced blocks (continuations joined, comments cut) and inline code spans."""
    for block in _FENCE.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            yield line.split(" #", 1)[0].strip()
    yield from (span.strip() for span in _INLINE_CODE.findall(_FENCE.sub("", text)))


def _slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = _FENCE.sub("", page.read_text(encoding="utf-8"))
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+)$", text, re.M)}


def _makefile_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    return {m.group(1) for m in re.finditer(r"^([A-Za-z][\w-]*)\s*:(?!=)", text, re.M)}


def test_readme_is_at_most_10_kb() -> None:
    size = len(README.read_bytes())
    assert size <= README_LIMIT_BYTES, f"README.md is {size} bytes; move detail into docs/ (limit {README_LIMIT_BYTES})"


def test_docs_have_a_table_of_contents_listing_every_page() -> None:
    index = (ROOT / "docs" / "README.md").read_text(encoding="utf-8")
    linked = {target.split("#", 1)[0] for target in _LINK.findall(index)}
    missing = [p.name for p in DOCS if p.name != "README.md" and p.name not in linked]
    assert not missing, f"docs/README.md does not link {missing}"


def test_every_make_target_named_exists() -> None:
    targets = _makefile_targets()
    named = {(_rel(page), m.group(1)) for page in PAGES
             for line in _code_lines(page.read_text(encoding="utf-8"))
             for m in re.finditer(r"(?:^|\s|;|&&)make\s+([a-z][\w-]*)", line)}
    assert named, "no `make <target>` found: the pattern no longer matches the pages"
    missing = sorted((page, target) for page, target in named if target not in targets)
    assert not missing, f"make targets named in the docs but absent from the Makefile: {missing}"


def test_every_relative_link_resolves() -> None:
    broken: list[str] = []
    for page in PAGES:
        for target in _LINK.findall(page.read_text(encoding="utf-8")):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
                continue
            path_part, _, anchor = target.partition("#")
            dest = (page.parent / path_part).resolve() if path_part else page
            if not dest.exists():
                broken.append(f"{_rel(page)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{_rel(page)}: {target} (no heading #{anchor} in {dest.name})")
    assert not broken, "broken links:\n" + "\n".join(broken)


def _cli_main() -> Callable[[list[str]], Any]:
    """The function behind the ``medsynth`` command, from ``[project.scripts]``."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    module, _, attr = project["scripts"]["medsynth"].partition(":")
    main: Callable[[list[str]], Any] = getattr(importlib.import_module(module), attr)
    return main


def _help(main: Callable[[list[str]], Any], argv: list[str]) -> str | None:
    """``medsynth ARGV --help`` as text, or None when argparse refuses ARGV."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exited:
        main([*argv, "--help"])
    return out.getvalue() if exited.value.code == 0 else None


def test_every_medsynth_command_and_flag_named_exists() -> None:
    main = _cli_main()
    helps: dict[tuple[str, ...], str | None] = {}

    def help_of(path: tuple[str, ...]) -> str | None:
        if path not in helps:
            helps[path] = _help(main, list(path))
        return helps[path]

    checked, problems = 0, []
    for page in PAGES:
        for line in _code_lines(page.read_text(encoding="utf-8")):
            if not re.match(r"medsynth(\s|$)", line):
                continue
            tokens = shlex.split(line, posix=True)[1:]
            path: tuple[str, ...] = ()
            for token in (t for t in tokens if not t.startswith("-")):
                text = help_of((*path, token))
                if text is None or not text.startswith(f"usage: medsynth {' '.join((*path, token))}"):
                    if "COMMAND" in (help_of(path) or "").splitlines()[0]:  # a group: TOKEN must be a command
                        group = " ".join(("medsynth", *path))
                        problems.append(f"{_rel(page)}: `{line}`: `{group}` has no command {token!r}")
                    break
                path = (*path, token)
            text = help_of(path) or ""
            top = help_of(()) or ""
            for flag in (t.split("=", 1)[0] for t in tokens if t.startswith("-")):
                if flag not in text and flag not in top:
                    problems.append(f"{_rel(page)}: `{line}`: `medsynth {' '.join(path)}` has no {flag}")
            checked += 1
    assert not problems, "\n".join(problems)
    assert checked >= 10, f"only {checked} medsynth command lines found: the pattern no longer matches the pages"


def test_every_python_module_named_exists() -> None:
    named = {(_rel(page), m.group(1)) for page in PAGES
             for line in _code_lines(page.read_text(encoding="utf-8"))
             for m in re.finditer(r"python -m ([\w.]+)", line)}
    missing = sorted((page, mod) for page, mod in named if importlib.util.find_spec(mod) is None)
    assert not missing, f"modules named in the docs that do not exist: {missing}"


def test_rejection_table_lists_exactly_the_codes_reasons() -> None:
    text = (ROOT / "docs" / "dicom.md").read_text(encoding="utf-8")
    rows = set(re.findall(r"^\| `([a-z-]+)` \|", text, re.M))
    assert rows == set(REJECTION_REASONS), (
        f"docs/dicom.md lacks {sorted(set(REJECTION_REASONS) - rows)}, "
        f"has unknown {sorted(rows - set(REJECTION_REASONS))}"
    )


def _flatten(prefix: str, node: dict[str, Any], out: dict[str, Any]) -> dict[str, Any]:
    for key, value in node.items():
        if isinstance(value, dict):
            _flatten(f"{prefix}{key}.", value, out)
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_run_key_table_lists_exactly_the_keys_and_defaults_of_pyproject() -> None:
    app = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["flwr"]["app"]["config"]
    defaults = _flatten("", app, {})
    text = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    documented: dict[str, Any] = {}
    for keys, default in re.findall(r"^\| (`[a-z][\w.-]*`(?:, `[a-z][\w.-]*`)*) \| ([^|]+) \|", text, re.M):
        for key in re.findall(r"`([^`]+)`", keys):
            documented[key] = tomllib.loads(f"v = {default.strip()}")["v"]
    assert set(documented) == set(defaults), (
        f"docs/configuration.md lacks {sorted(set(defaults) - set(documented))}, "
        f"has unknown {sorted(set(documented) - set(defaults))}"
    )
    wrong = {k: (documented[k], defaults[k]) for k in defaults if documented[k] != defaults[k]}
    assert not wrong, f"documented default differs from pyproject.toml (doc, pyproject): {wrong}"
