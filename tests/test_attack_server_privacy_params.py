"""Attack: the server chooses the privacy parameters. A run with δ = 0.5 meets "ε = 10" with
σ = 0.379, which is ε ≈ 42.5 at δ = 1e-5; a run could also switch the accountant or decide
which of a hospital's label folders train. The hospital's own settings decide: such a run is
refused with a clear message before the ledger, the data or any key is touched."""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.app import Context, Message, RecordDict

from client.app import train
from client.audit import read_entries
from common.protocol.messages import decode_reply, encode_train_request, error_reason
from tests.helpers import default_run_config

NODE = {"site-id": "site-0", "epsilon-budget": 10.0, "delta": 1e-5, "accountant": "prv",
        "class-names": "normal,lesion", "members": "site-0=" + "ab" * 32 + ",site-1=" + "cd" * 32}

pytestmark = pytest.mark.usefixtures("task_identity")


def _ask(tmp_path: Path, **run: object) -> tuple[str, str]:
    """Send a plain train request of a run with ``run`` overrides to a deployed hospital."""
    (tmp_path / "dicom").mkdir(exist_ok=True)
    node = {**NODE, "data-dir": str(tmp_path / "dicom"), "state-dir": str(tmp_path),
            "allow-plain-aggregation": True}
    cfg = default_run_config(**{"secure-aggregation": False, "warm-start__budget-share": 0.0, **run})
    msg = Message(encode_train_request({}, 1), dst_node_id=5, message_type="train", group_id="1")
    ctx = Context(run_id=1, node_id=5, node_config=node, state=RecordDict(), run_config=cfg)  # type: ignore[arg-type]
    reply = decode_reply(train(msg, ctx).content)
    (entry,) = read_entries(tmp_path / "audit.jsonl")
    return reply.reason, entry.detail


@pytest.mark.parametrize(
    ("run", "named"),
    [
        ({"dp__delta": 0.5}, "δ = 0.5"),
        ({"dp__delta": 1e-6}, "δ = 1e-06"),
        ({"dp__accountant": "rdp"}, "rdp accountant"),
        ({"data__class-names": "lesion,normal"}, "['lesion', 'normal']"),
        ({"data__class-names": "normal,lesion,tumour"}, "tumour"),
    ],
)
def test_a_run_asking_for_other_privacy_parameters_or_classes_is_refused_before_any_charge(
    tmp_path: Path, run: dict[str, object], named: str
) -> None:
    # act
    reason, detail = _ask(tmp_path, **run)
    # assert: the fixed reply text; the hospital's own log names the request; no ledger, no cache
    assert reason == error_reason("run-refused")
    assert named in detail and "RunRefused" in detail
    assert not (tmp_path / "ledger.json").exists() and not (tmp_path / "cache").exists()


def test_the_hospitals_own_parameters_pass_the_check(tmp_path: Path) -> None:
    # act: the same request with the hospital's δ, accountant and classes (no data: it fails later)
    reason, detail = _ask(tmp_path)
    # assert: not refused by the policy (it got as far as the data folder)
    assert reason != error_reason("run-refused") and "RunRefused" not in detail
