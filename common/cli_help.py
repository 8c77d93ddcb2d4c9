"""The help formatter of every ``medsynth`` command: each option's default said once.

argparse's ``ArgumentDefaultsHelpFormatter`` appends ``(default: VALUE)`` to every option's
help, even when the help already explains its default in words ("default: sorted folder names")
and when the default is ``None`` or ``False``, which only mean "not given". That printed
``(default: …) (default: None)`` on many options. This formatter appends the value only when it
says something: the default is a value (not ``None``, not ``False``, not suppressed) and the
help text does not already mention a default.
"""

from __future__ import annotations

import argparse
import re

# --candidates of sample, evaluate and node augment: one text for the two filters it drives
# (common/models.py's class filter, common/pair_filter.py's consistency filter).
CANDIDATES_HELP = ("draw this many per image kept and keep the one the model's discriminator finds most likely of its "
                   "class; of a pair model, the pair whose mask a U-Net trained on the model's own pairs agrees with "
                   "best (1: no filter; docs/evaluation.md)")

_MENTIONS_DEFAULT = re.compile(r"\bdefault\b", re.IGNORECASE)


def says_its_default(help_text: str) -> bool:
    """Whether an option's help already mentions its default (in words or as ``%(default)s``)."""
    return _MENTIONS_DEFAULT.search(help_text) is not None


class DefaultsOnceHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``ArgumentDefaultsHelpFormatter`` that never says a default twice, nor a meaningless one."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if says_its_default(text) or action.default in (None, False, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)
