"""Flower ServerApp: parses the run config once and hands the Grid to the round loop.

A :class:`common.errors.UserError` that ends the run (hospitals that did not join in time, a
corrupt state file) is written to ``output-dir/last_error.json`` (``server.outcome``) before it
leaves, so that ``medsynth server start`` can say it in one line and exit with its code; Flower
itself keeps only the text of the exception.
"""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.config import RunConfig
from common.errors import UserError
from server.outcome import ServerAppError
from server.rounds import ServerPaths, run_federation

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run or resume the federation; results go to ``output-dir`` (default ./medsynth-output)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    # httpx logs every request at INFO, including Flower's own log pushes: a feedback loop
    logging.getLogger("httpx").setLevel(logging.WARNING)
    run = RunConfig.from_flower(context.run_config)
    paths = ServerPaths(Path(run.federation.output_dir or "medsynth-output").resolve())
    try:
        run_federation(grid, run, paths, run_id=context.run_id)
    except UserError as exc:
        ServerAppError.of(exc, context.run_id).write(paths.last_error)
        raise
