"""A hospital runs only the app bundles it agreed to: the FAB hash allow-list.

Why not Flower's own check: ``flower-supernode --trusted-entities`` accepts only FABs whose
verification records say ``valid_license``, and in flwr 1.41 the SuperLink writes those only for
apps fetched from Flower Hub (``control_handlers._format_verification``); a FAB submitted with
``flwr run`` from a local folder is always refused, so the open-source SuperNode has no usable
allow-list for a private consortium.

What the node daemon does instead: the SuperNode's SuperExec starts every ClientApp by running
``flwr-clientapp`` from ``PATH``. ``medsynth node start`` puts a folder first on that ``PATH``
whose ``flwr-clientapp`` (:mod:`client.forkserver`) ends in :func:`main`, in a process forked
from the node's fork server or, without one, in its own: Flower's own ClientApp process, except that the
step that installs the received bundle first checks SHA-256 of the bundle's bytes (computed
here, not taken from the server) against ``allowed-fab-sha256`` in ``node.toml``. A bundle not
on the list is never installed or imported: the ClientApp process fails before any app code
runs, and Flower sends the server an error reply naming :class:`AppNotAllowed`. Each verdict is
one log line on the ClientApp's stderr, which is the SuperNode's log (``app allow-list:
accepted …`` or ``… refused …``, with the bundle's hash); the node daemon echoes them on its
console. The gate depends on one name in Flower's internals
(``flwr.supernode.runtime.run_clientapp.install_from_fab``); ``tests/test_audit_gate.py`` fails
if a Flower upgrade moves it.

The operator publishes the hash with ``medsynth server fab-hash`` (the FAB is built
deterministically from the app folder), and hospitals copy it into ``node.toml``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

ALLOWLIST_ENV = "MEDSYNTH_ALLOWED_FABS"
#: ``1`` when ``node.toml`` says ``[apps] any-app-may-run = true`` (and the list is empty).
ANY_APP_ENV = "MEDSYNTH_ANY_APP"
log = logging.getLogger("medsynth.node")


class AppNotAllowed(PermissionError):
    """The SuperLink sent an app bundle whose hash is not on this hospital's allow-list."""


def fab_sha256(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def allowed_hashes(environ: dict[str, str] | None = None) -> frozenset[str]:
    raw = (environ if environ is not None else dict(os.environ)).get(ALLOWLIST_ENV, "")
    return frozenset(h.strip().lower() for h in raw.split(",") if h.strip())


def gated_installer(install: Callable[..., Path], allowed: frozenset[str]) -> Callable[..., Path]:
    """``install`` (Flower's ``install_from_fab``) that refuses bundles outside ``allowed``."""

    def install_if_allowed(fab_file: bytes | Path, *args: object, **kwargs: object) -> Path:
        content = fab_file if isinstance(fab_file, bytes) else Path(fab_file).read_bytes()
        digest = fab_sha256(content)
        if digest not in allowed:
            log.error("app allow-list: refused app bundle sha256 %s: not on [apps] allowed-fab-sha256 in node.toml; "
                      "it was not installed or run", digest)
            raise AppNotAllowed(
                f"app bundle sha256 {digest} is not on this hospital's allow-list (node.toml "
                "[apps] allowed-fab-sha256); it was not installed or run"
            )
        log.info("app allow-list: accepted app bundle sha256 %s (on [apps] allowed-fab-sha256)", digest)
        return install(fab_file, *args, **kwargs)

    return install_if_allowed


def main() -> None:
    """Flower's ClientApp process (``flwr-clientapp`` arguments in ``sys.argv``) behind the allow-list.

    With :data:`ANY_APP_ENV` = ``1`` (``[apps] any-app-may-run = true``) and no list, every bundle
    runs; with neither, nothing does.
    """
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp
    from flwr.supernode.runtime import run_clientapp

    handler = logging.StreamHandler(sys.stderr)  # the SuperNode's log; Flower configures only its own logger
    handler.setFormatter(logging.Formatter("%(levelname)-8s medsynth: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    allowed = allowed_hashes()
    if allowed:
        installer = getattr(run_clientapp, "install_from_fab")  # noqa: B009 - Flower-internal name, checked by a test
        setattr(run_clientapp, "install_from_fab", gated_installer(installer, allowed))  # noqa: B010
    elif os.environ.get(ANY_APP_ENV) != "1":
        sys.exit(f"{ALLOWLIST_ENV} is empty and {ANY_APP_ENV} is not 1: the FAB gate would refuse every app; "
                 "check node.toml [apps]")
    flwr_clientapp()
