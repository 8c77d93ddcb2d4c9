"""Running Flower's daemons: ``flower-superlink``, ``flower-supernode`` and the ``flwr`` CLI.

One place for what the hospital daemon (``client.daemon``), the server daemon
(``server.daemon``) and the simulation harness all do with Flower processes:

* :mod:`~common.flower.env`: the executables, an isolating environment (:class:`FlowerEnv`:
  private ``FLWR_HOME``, telemetry off, a process tag; a Ray temp dir only for the Simulation
  Engine), free ports, and where the app folder is;
* :mod:`~common.flower.commands`: the SuperLink and SuperNode command lines and the
  ``--run-config``/``--node-config`` strings;
* :mod:`~common.flower.processes`: start in a new session with a log, wait for ``/health``,
  stop (SIGTERM, then SIGKILL) only the processes we started, by PID and tag;
* :mod:`~common.flower.flwr_cli`: ``flwr ... --format json`` calls and a whole ``flwr run``;
* :mod:`~common.flower.fab`: the app bundle (FAB) ``flwr build`` makes, without walking ``.venv``;
* :mod:`~common.flower.errors`: the typed errors, rooted at :class:`SuperLinkError`.

Only the standard library and ``tomli_w`` are imported at module level (``fab`` imports Flower's
builder when called), so this package travels in the app
bundle and costs nothing to import.
"""

from common.flower.commands import (
    NodeConfig,
    RunConfigValue,
    ServerTls,
    format_run_config,
    node_config_argument,
    superlink_command,
    supernode_command,
    write_run_config_file,
)
from common.flower.env import (
    MAX_RAY_TMPDIR_LEN,
    TAG_ENV_VAR,
    FlowerEnv,
    app_dir,
    check_app_folder,
    executable,
    free_port,
)
from common.flower.errors import (
    CertificateNotTrusted,
    DaemonExited,
    HealthTimeout,
    NotHealthy,
    RunFailedError,
    SuperLinkError,
)
from common.flower.flwr_cli import FlowerConnection, RunResult, flwr_json, parse_json_output, run_app
from common.flower.processes import (
    describe_pids,
    find_tagged_pids,
    kill_now,
    signal_pids,
    signal_tagged_until_gone,
    sigterm_raises_interrupt,
    spawn,
    tail,
    terminate_then_kill,
    wait_healthy,
)

__all__ = [
    "MAX_RAY_TMPDIR_LEN",
    "TAG_ENV_VAR",
    "CertificateNotTrusted",
    "DaemonExited",
    "FlowerConnection",
    "FlowerEnv",
    "HealthTimeout",
    "NodeConfig",
    "NotHealthy",
    "RunConfigValue",
    "RunFailedError",
    "RunResult",
    "ServerTls",
    "SuperLinkError",
    "app_dir",
    "check_app_folder",
    "describe_pids",
    "executable",
    "find_tagged_pids",
    "flwr_json",
    "format_run_config",
    "free_port",
    "kill_now",
    "node_config_argument",
    "parse_json_output",
    "run_app",
    "signal_pids",
    "signal_tagged_until_gone",
    "sigterm_raises_interrupt",
    "spawn",
    "superlink_command",
    "supernode_command",
    "tail",
    "terminate_then_kill",
    "wait_healthy",
    "write_run_config_file",
]
