"""The final global model the server sends after the last round: checked, kept, acknowledged.

``query.final_model`` (``common.protocol.messages.FINAL_MODEL``) carries the model of the run's
last completed round, and every hospital's newest privacy report (ε, δ, budget, steps: public
values). The hospital checks the model like any received global model (the run's names and
shapes, finite, in range: ``client.policy``), keeps it with the reports as its newest global model
(where ``medsynth node evaluate`` and ``node augment`` read it: an export's sidecar then names
every hospital's ε) and answers with its site id and the round, both public.
Nothing is trained, no data is read and nothing is charged to the ledger.
"""

from __future__ import annotations

from flwr.app import RecordDict

from client.policy import check_global_model
from common.config import RunConfig, SiteConfig
from common.protocol.messages import decode_final_model, encode_final_ack


def keep_final_model(run: RunConfig, site: SiteConfig, content: RecordDict, *, run_id: int) -> RecordDict:
    """Check and keep the final model; the answer says which round this site kept."""
    from client.task import keep_global_model  # torch: loaded only when a model is handled
    from common.models import build_models
    from common.weights import model_arrays

    arrays, model_round, reports = decode_final_model(content)
    netG, netD = build_models(run.model)
    check_global_model(arrays, {k: tuple(v.shape) for k, v in model_arrays(netG, netD).items()})
    keep_global_model(site, run, arrays, run_id=run_id, model_round=model_round, site_privacy=reports)
    return encode_final_ack(site.site_id, model_round)
