"""Named run presets: ``presets/<name>.toml`` beside ``pyproject.toml``, holding only overrides of
``[tool.flwr.app.config]`` (same keys, same types, nested or flattened).

A preset is a recipe someone tuned (the PneumoniaMNIST settings of the quality benchmark), kept
as data so that it cannot drift into a second copy of the app defaults: what it does not say is
the app default. An unknown preset, an unknown key or a value of the wrong type is refused.
"""

from __future__ import annotations

from pathlib import Path

from common.config import ConfigError, ConfigValue, check_overrides, flatten_table, project_root, read_toml

PRESETS_DIR = "presets"  # under the app folder (common.config.project_root)


def preset_names(project: Path | None = None) -> list[str]:
    """The presets there are, sorted."""
    folder = (project or project_root()) / PRESETS_DIR
    return sorted(p.stem for p in folder.glob("*.toml"))


def load_preset(name: str, project: Path | None = None) -> dict[str, ConfigValue]:
    """The run config overrides of preset ``name``, flattened and checked against the app defaults."""
    known = preset_names(project)
    if name not in known:
        raise ConfigError(f"unknown preset {name!r}; known: {', '.join(known) or 'none'} "
                          f"(files {PRESETS_DIR}/<name>.toml beside pyproject.toml)")
    path = (project or project_root()) / PRESETS_DIR / f"{name}.toml"
    return check_overrides(flatten_table(read_toml(path)), project, where=f"preset {name}: ")
