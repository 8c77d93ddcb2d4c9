"""``UserError``: every error a person can fix, its exit code, and the fixed code a hospital answers with.

The command line prints a ``UserError`` as one line and exits with its code (2: fix something
first; 1: start again); the ClientApp answers one with the fixed code of its class and never with
its message, which may hold a value computed from patient data.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
from flwr.app import Context, Message, RecordDict

from client.app import _handle, error_code, error_codes
from client.audit import AuditLogCorrupt, read_entries
from client.augment import AugmentUnavailable
from client.ledger import (
    AccountingMismatch,
    AuditLogBehind,
    LedgerCorrupt,
    LedgerMismatch,
    LedgerMissing,
    LedgerRolledBack,
)
from client.policy import ModelRefused, RunRefused
from client.prepare.labels import LabelError
from client.prepare.pipeline import PrepareError
from client.release import ReleaseRecordCorrupt
from common.audit_record import AuditRecordError
from common.certs import CertificateError
from common.checkpoint_model import CheckpointUnusable
from common.config import ConfigError
from common.dataset import DatasetError
from common.dicom.errors import DicomRejected
from common.dp.accounting import PrivacyBudgetExceeded
from common.errors import EXIT_FIX_CONFIG, EXIT_RESTARTABLE, MissingFile, UserError
from common.evaluation.augment import AugmentError
from common.evaluation.evaluate import EvaluationError, PairCacheRequired
from common.evaluation.features import ExtractorCacheCorrupt
from common.evaluation.reference import ReferenceDataError
from common.export import ExportError
from common.flower.errors import (
    CertificateNotTrusted,
    DaemonExited,
    HealthTimeout,
    NotHealthy,
    RunFailedError,
    SuperLinkError,
)
from common.protocol.messages import ProtocolError, decode_reply, encode_train_request, error_reason
from common.round_record import RecordError
from common.secagg import AlreadyReleased, KeySwapDetected, MembershipMismatch, NothingToMask, ValueOutOfRange

pytestmark = pytest.mark.usefixtures("task_identity")

# each class a ClientApp action can raise → the fixed code its reply carries
ANSWERED = [
    (RunRefused("x"), "run-refused"),
    (ModelRefused("x"), "model-refused"),
    (MembershipMismatch("x"), "membership"),
    (AlreadyReleased("x"), "already-released"),
    (NothingToMask("x"), "nothing-to-mask"),
    (ValueOutOfRange("x"), "out-of-range"),
    (KeySwapDetected("x"), "secagg-abort"),
    (LedgerCorrupt("x"), "ledger"),
    (LedgerMismatch("x"), "ledger"),
    (LedgerMissing("x"), "ledger"),
    (LedgerRolledBack("x"), "ledger"),
    (AuditLogBehind("x"), "ledger"),
    (AuditLogCorrupt("x"), "ledger"),
    (ReleaseRecordCorrupt("x"), "ledger"),
    (ConfigError("x"), "config"),
    (DatasetError("x"), "data"),
    (PrepareError("x"), "data"),
    (MissingFile("x"), "data"),
    (FileNotFoundError("x"), "data"),
    (ProtocolError("x"), "protocol"),
    (AccountingMismatch("x"), "internal"),  # a bug, not a UserError
]

# UserErrors of common/ and client/ that no ClientApp action lets out, and why

NEVER_ANSWERED = {
    CertificateError: "keys and certificates: checked by `node start` and the certs commands, before a ClientApp runs",
    RecordError: "the server's round records: the server, its report and the harness read them, a hospital never",
    **{cls: "the Flower process layer: the daemons and the harness start processes, a ClientApp never does"
       for cls in (SuperLinkError, NotHealthy, DaemonExited, HealthTimeout, CertificateNotTrusted, RunFailedError)},
    PrivacyBudgetExceeded: "client.task turns it into the reply status budget-exhausted",
    DicomRejected: "the prepare step records a rejected file and goes on",
    LabelError: "the prepare step raises it as a PrepareError",
    CheckpointUnusable: "evaluate and sample commands only",
    EvaluationError: "evaluate commands only",
    PairCacheRequired: "evaluate commands only (a pair model and a cache without masks)",
    ExportError: "the sample command only",
    ExtractorCacheCorrupt: "evaluate commands only",
    ReferenceDataError: "evaluate commands only",
    AuditRecordError: "audit.json: the audit command and the server's report read it, a hospital never",
    AugmentUnavailable: "the node augment and train-classifier commands only",
    AugmentError: "the node train-classifier command and the augment benchmark only",
}

# what the command line answered with one line and exit 2 before UserError existed
ONE_LINE_BEFORE = [
    "common.config.ConfigError", "common.dataset.DatasetError", "common.dicom.errors.DicomRejected",
    "client.ledger.LedgerCorrupt", "client.ledger.LedgerMismatch", "client.ledger.LedgerMissing",
    "client.ledger.LedgerRolledBack", "client.ledger.AuditLogBehind", "simulation.partition.PartitionError",
    "client.prepare.pipeline.PrepareError", "common.dp.accounting.PrivacyBudgetExceeded",
    "simulation.partition.SourceDataError", "common.flower.errors.SuperLinkError",
    "common.checkpoint_model.CheckpointUnusable", "common.evaluation.evaluate.EvaluationError",
    "common.export.ExportError", "common.evaluation.features.ExtractorCacheCorrupt",
    "common.evaluation.reference.ReferenceDataError", "client.audit.AuditLogCorrupt", "common.certs.CertificateError",
]

# a restart can succeed: the deployment units restart on exit 1
RESTARTABLE = {"server.daemon.ServerCrashed", "server.daemon.RunStopped", "server.secagg.SecureRoundFailed",
               "server.rounds.NoHospitals"}


def _class(dotted: str) -> type[BaseException]:
    module, _, name = dotted.rpartition(".")
    cls: type[BaseException] = getattr(importlib.import_module(module), name)
    return cls


def _all_user_errors() -> set[type[UserError]]:
    found: set[type[UserError]] = set()
    todo: list[type[UserError]] = [UserError]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub not in found:
                found.add(sub)
                todo.append(sub)
    return found


@pytest.mark.parametrize(("exc", "code"), ANSWERED, ids=lambda v: type(v).__name__ if isinstance(v, Exception) else v)
def test_each_error_class_has_its_fixed_code(exc: Exception, code: str) -> None:
    assert error_code(exc) == code


def test_every_user_error_a_client_action_can_raise_has_a_code() -> None:
    # prepare: every module of common/ and client/, so the answer does not depend on which other
    # tests ran first
    import pkgutil

    import client
    import common

    for package in (common, client):
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            importlib.import_module(info.name)
    # act
    unanswered = {cls for cls in _all_user_errors()
                  if cls.__module__.partition(".")[0] in ("common", "client")
                  and not cls.__module__.startswith("tests")
                  and error_code(cls.__new__(cls)) == "internal"}
    # assert: each is either coded or known never to leave an action; every code is a fixed text
    assert unanswered - set(NEVER_ANSWERED) == set()
    assert all(error_reason(code) for _, code in error_codes())


def test_what_printed_one_line_before_still_exits_2_and_crashes_exit_1() -> None:
    # prepare
    for dotted in (*ONE_LINE_BEFORE, *RESTARTABLE):
        importlib.import_module(dotted.rpartition(".")[0])
    # act
    codes = {f"{cls.__module__}.{cls.__qualname__}": cls.exit_code for cls in _all_user_errors()
             if cls.__module__.partition(".")[0] in ("common", "client", "server", "simulation")}
    # assert
    for dotted in ONE_LINE_BEFORE:
        assert issubclass(_class(dotted), UserError) and codes[dotted] == EXIT_FIX_CONFIG, dotted
    assert {name for name, code in codes.items() if code == EXIT_RESTARTABLE} == RESTARTABLE
    assert set(codes.values()) == {EXIT_FIX_CONFIG, EXIT_RESTARTABLE}


def test_user_errors_keep_the_bases_code_catches_them_by() -> None:
    assert issubclass(ConfigError, ValueError) and issubclass(ProtocolError, ValueError)
    assert issubclass(MissingFile, FileNotFoundError) and issubclass(_class("common.flower.errors.SuperLinkError"),
                                                                     RuntimeError)


def _context(tmp_path: Path) -> Context:
    from tests.helpers import default_run_config

    node: dict[str, bool | float | int | str] = {
        "site-id": "site-0", "data-dir": str(tmp_path / "dicom"), "state-dir": str(tmp_path),
        "epsilon-budget": 10.0, "class-names": "normal,lesion", "members": "site-0=" + "ab" * 32,
    }
    return Context(run_id=1, node_id=5, node_config=node, state=RecordDict(),
                   run_config=default_run_config(**{"warm-start__budget-share": 0.0}))  # type: ignore[arg-type]  # run config: values of any type


@pytest.mark.parametrize(
    ("exc", "code"),
    [(PrepareError("no usable image among 737 files of patient 42"), "data"),
     (PrivacyBudgetExceeded(9.87, 10.5, 10.0), "internal")],
)
def test_a_user_error_reply_carries_its_code_never_its_message(tmp_path: Path, exc: Exception, code: str) -> None:
    # prepare
    msg = Message(encode_train_request({}, 1), dst_node_id=5, message_type="train", group_id="1")

    def act(run: object, site: object) -> RecordDict:
        raise exc

    # act
    reply = _handle(msg, _context(tmp_path), act)
    # assert: the fixed text leaves; the message stays in the audit log
    assert decode_reply(reply.content).reason == error_reason(code)
    (entry,) = read_entries(tmp_path / "audit.jsonl")
    assert str(exc) in entry.detail and str(exc) not in decode_reply(reply.content).reason
