"""Flower ServerApp: parses the run config once and hands the Grid to the round loop."""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.config import RunConfig
from server.rounds import ServerPaths, run_federation

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run or resume the federation; results go to ``output-dir`` (default ./medsynth-output)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    # httpx logs every request at INFO, including Flower's own log pushes: a feedback loop
    logging.getLogger("httpx").setLevel(logging.WARNING)
    run = RunConfig.from_flower(context.run_config)
    root = Path(run.federation.output_dir or "medsynth-output").resolve()
    run_federation(grid, run, ServerPaths(root), run_id=context.run_id)
