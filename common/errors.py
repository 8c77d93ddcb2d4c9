"""The root of every error a person can fix: :class:`UserError`.

A ``UserError``'s message says what is wrong and what to do about it. The ``medsynth`` command
prints it as one line and exits with its :attr:`UserError.exit_code`; anything that is not a
``UserError`` is a bug and keeps its traceback. A hospital's ClientApp answers a ``UserError``
with the fixed error code of its class (``client.app.error_codes``), never with the message.

Exit codes follow what a supervisor (systemd, a container runtime) should do next:

* ``EXIT_FIX_CONFIG`` (2): a person must change something (configuration, keys, data) first;
  the deployment units do not restart on it (``RestartPreventExitStatus=2``);
* ``EXIT_RESTARTABLE`` (1): the same command, started again, can succeed (a crashed server
  resumes from its last checkpoint).
"""

from __future__ import annotations

from typing import ClassVar

EXIT_FIX_CONFIG = 2
EXIT_RESTARTABLE = 1
EXIT_INTERRUPTED = 130  # SIGINT, or SIGTERM during `server start`; the systemd units count it as success


class UserError(Exception):
    """Something a person can fix; the message says what to do.

    Subclasses keep their other bases (``ValueError``, ``RuntimeError``, ...) where code catches
    them by those.
    """

    exit_code: ClassVar[int] = EXIT_FIX_CONFIG


class MissingFile(UserError, FileNotFoundError):
    """A file the configuration names does not exist; the message says what makes it."""
