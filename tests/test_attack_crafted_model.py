"""Attack: values in error replies, via a crafted global model. A discriminator bias of −1e10
pushed a loss out of its quantisation bound, and the hospital's error reply carried the exact
offending value, from which its patient counts were computed. Now a received model with a
non-finite or out-of-range parameter is refused before any training or charge, and every error
reply carries one of the fixed texts of ``common.protocol.messages.ERRORS``: no value ever leaves in an
error. The cause stays in the hospital's log and audit log, and every reply has an audit line."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, Message, RecordDict

from client.app import _handle
from client.audit import read_entries
from client.policy import MODEL_VALUE_BOUND
from common.protocol.messages import ERRORS, decode_reply, encode_train_request, error_reason
from common.secagg import ValueOutOfRange
from tests.attacker import Attack, write_sites

pytestmark = pytest.mark.usefixtures("task_identity")


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_sites(tmp_path_factory.mktemp("crafted"), [5, 5, 5])


@pytest.mark.parametrize("value", [-1e10, float("nan"), float("inf"), 2 * MODEL_VALUE_BOUND])
def test_a_crafted_global_model_is_refused_before_any_charge(sites: Path, tmp_path: Path, value: float) -> None:
    # prepare: the server's global model with one crafted discriminator bias
    attack = Attack(sites, tmp_path, 3)
    crafted = {k: v.copy() for k, v in attack.arrays.items()}
    bias = next(k for k in sorted(crafted) if k.startswith("d.") and k.endswith("bias"))
    crafted[bias].flat[0] = value

    # act
    privacy, _ = attack.driver.train(attack.nodes, crafted, 1, attack.failures)

    # assert: refused everywhere with the fixed text, nothing charged, the cause only in the audit log
    assert privacy == {}
    assert [f.split(": ", 2)[2] for f in attack.failures if f.startswith("train:")] == \
        [error_reason("model-refused")] * 3
    for site in ("site-0", "site-1", "site-2"):
        assert not (attack.state(site) / "ledger.json").exists()
        (entry,) = attack.audit(site)
        assert entry.status == "error" and bias in entry.detail


def test_a_model_of_another_shape_is_refused(sites: Path, tmp_path: Path) -> None:
    # prepare: one tensor of the wrong shape
    attack = Attack(sites, tmp_path, 3)
    crafted = dict(attack.arrays)
    name = sorted(crafted)[0]
    crafted[name] = np.zeros((*crafted[name].shape, 2), dtype=crafted[name].dtype)
    # act
    privacy, _ = attack.driver.train(attack.nodes[:1], crafted, 1, attack.failures)
    # assert
    assert privacy == {} and attack.failures == [f"train: site-0: {error_reason('model-refused')}"]
    assert not (attack.state("site-0") / "ledger.json").exists()


def _context(tmp_path: Path) -> Context:
    node = {"site-id": "site-0", "data-dir": str(tmp_path / "dicom"), "state-dir": str(tmp_path),
            "epsilon-budget": 10.0, "class-names": "normal,lesion", "members": "site-0=" + "ab" * 32}
    from tests.helpers import default_run_config

    return Context(run_id=1, node_id=5, node_config=node, state=RecordDict(),
                   run_config=default_run_config(**{"warm-start__budget-share": 0.0}))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (ValueOutOfRange("ω·loss_g = 1234.5678 outside ±1000 (patients 737)"), "out-of-range"),
        (RuntimeError("unexpected: tensor holds 0.123456 at patient 42"), "internal"),
        (ZeroDivisionError("737 / 0"), "internal"),
    ],
)
def test_an_error_reply_carries_a_fixed_text_and_no_value(tmp_path: Path, exc: Exception, code: str) -> None:
    # prepare: an action that fails with a message full of data-dependent numbers
    msg = Message(encode_train_request({}, 1), dst_node_id=5, message_type="train", group_id="1")

    def act(run: object, site: object) -> RecordDict:
        raise exc

    # act
    reply = _handle(msg, _context(tmp_path), act)  # type: ignore[arg-type]

    # assert: the reply is the fixed text (no digit at all), and the audit log has the cause
    decoded = decode_reply(reply.content)
    assert decoded.status == "error" and decoded.reason == error_reason(code)
    assert not re.search(r"\d", decoded.reason)
    (entry,) = read_entries(tmp_path / "audit.jsonl")
    assert entry.status == "error" and str(exc) in entry.detail


def test_no_fixed_error_text_holds_a_digit() -> None:
    assert not any(re.search(r"\d", text) for text in ERRORS.values())


def test_a_reply_to_a_hospital_with_a_broken_config_is_still_audited(tmp_path: Path) -> None:
    # prepare: a node config without the hospital's class names (the site config cannot be built)
    ctx = _context(tmp_path)
    del ctx.node_config["class-names"]
    msg = Message(encode_train_request({}, 1), dst_node_id=5, message_type="train", group_id="1")
    # act
    reply = _handle(msg, ctx, lambda run, site: RecordDict())
    # assert
    assert decode_reply(reply.content).reason == error_reason("config")
    (entry,) = read_entries(tmp_path / "audit.jsonl")
    assert entry.status == "error" and "class-names" in entry.detail
