"""Secure aggregation wired into the round loop: same model as plain, dropouts at every stage.

Both modes run the real hospital code in process (``tests.inprocess``) with
``sim.deterministic-noise`` so that a site's update in round r is identical in both runs; the
secure result must then equal the plain one within the stated quantization error.
"""

from __future__ import annotations

from pathlib import Path
from typing import cast

import numpy as np
import pytest
from flwr.app import ConfigRecord

from client.release import ReleaseRecord
from common.checkpoint import latest_valid_checkpoint
from common.config import RunConfig
from common.round_record import ServerState
from common.secagg import CommGraph, KeyAdvert, Session
from server.rounds import ServerPaths, run_federation
from tests.helpers import RUN_ID, default_run_config
from tests.inprocess import DropRule, InProcessGrid, fresh_state, write_phantom_sites

pytestmark = pytest.mark.usefixtures("task_identity")


@pytest.fixture(scope="module")
def sites4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_phantom_sites(tmp_path_factory.mktemp("sites4"), 4, patients_per_site=12)


def _config(sites: Path, out: Path, secure: bool, rounds: int = 1) -> dict[str, object]:
    return default_run_config(**{
        "sim__sites-dir": str(sites), "output-dir": str(out), "num-server-rounds": rounds,
        "train__local-steps": 3, "train__batch-size": 4, "model__g-width": 16, "model__d-width": 16,
        "dp__calibrate": False, "dp__noise-multiplier": 1.2, "wait-nodes-timeout": 5.0,
        "secure-aggregation": secure, "sim__deterministic-noise": True, "min-nodes": 3, "warm-start__budget-share": 0.0,
        "round-timeout": 1.0,  # in process a reply comes at once or never (a dropped message)
    })


def _run(sites: Path, out: Path, secure: bool, drop: DropRule | None = None, rounds: int = 1,
         grid: InProcessGrid | None = None, extra: dict[str, object] | None = None) -> ServerState:
    fresh_state(sites)
    cfg = {**_config(sites, out, secure, rounds), **(extra or {})}
    grid = grid or InProcessGrid(4, cfg, RUN_ID, drop=drop)
    grid.run_config = cfg
    return run_federation(grid, RunConfig.from_flower(cfg), ServerPaths(out), RUN_ID)  # type: ignore[arg-type]


def _final(out: Path) -> dict[str, np.ndarray]:
    ckpt = latest_valid_checkpoint(out / "checkpoints")
    assert ckpt is not None
    return ckpt.arrays


def _assert_same_model(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    # quantization error of the sum is ≤ n·B/(2^48−1) ≈ 1e-15 per element before dividing by
    # Σω ≈ 4.6e-5: ≈ 2e-11; what remains is float32 rounding of the stored model.
    assert a.keys() == b.keys()
    worst = max(float(np.max(np.abs(a[k].astype(np.float64) - b[k]))) for k in a)
    assert worst < 1e-6


def test_secure_aggregation_gives_the_plain_model(sites4: Path, tmp_path: Path) -> None:
    # act: the secure run pushes at most 2 of a stage's messages at a time, as a large simulation
    # does (server.exchange); in process a hospital answers inside the push, so the stage's
    # deadline is long enough for all of them
    plain = _run(sites4, tmp_path / "plain", secure=False)
    secure = _run(sites4, tmp_path / "secure", secure=True,
                  extra={"sim.messages-in-flight": 2, "round-timeout": 120.0})
    # assert
    _assert_same_model(_final(tmp_path / "plain"), _final(tmp_path / "secure"))
    assert secure.rounds[0].sites_trained == plain.rounds[0].sites_trained == (
        "site-0", "site-1", "site-2", "site-3")
    # metrics: quantization error n·B/(2^48−1)/Σω with the public ω = 1 each: 4·1e3/2.8e14/4 ≈ 4e-12
    metric_error = 4 * 1e3 / (2**48 - 1) / 4
    secure_metrics, plain_metrics = secure.rounds[0].metrics, plain.rounds[0].metrics
    assert secure_metrics is not None and plain_metrics is not None
    assert secure_metrics.loss_d_fake == pytest.approx(plain_metrics.loss_d_fake, abs=metric_error)
    assert secure.secure_aggregation is True and plain.secure_aggregation is False
    stats = secure.rounds[0].secure
    assert stats is not None and stats.dead == ()


def test_in_a_secure_round_only_the_ledger_figures_travel_in_plain_text(sites4: Path, tmp_path: Path) -> None:
    # act
    grid = InProcessGrid(4, {}, RUN_ID)
    _run(sites4, tmp_path, secure=True, grid=grid)
    # assert: a train reply is a privacy record with ledger figures and σ only (no patient count,
    # no loss, no timing; σ is the same at every hospital: a function of public values and the
    # hospitals' equal settings); a mask reply is a uint64 masked vector and encrypted shares
    train_replies = [m for m in grid.replies if m.metadata.message_type == "train"]
    mask_replies = [m for m in grid.replies if m.metadata.message_type == "train.secagg_mask"]
    assert len(train_replies) == len(mask_replies) == 4
    for msg in train_replies:
        assert not msg.content.array_records and set(msg.content.config_records) == {"privacy"}
        assert set(msg.content.config_records["privacy"]) == {
            "site", "status", "epsilon", "epsilon-budget", "delta", "steps", "noise-multiplier", "reason"}
    assert len({m.content.config_records["privacy"]["noise-multiplier"] for m in train_replies}) == 1
    for msg in mask_replies:
        assert set(msg.content.array_records) == {"masked"}
        assert msg.content.array_records["masked"]["y"].numpy().dtype == np.uint64
        assert set(msg.content.config_records) == {"secagg"}
        assert set(msg.content.config_records["secagg"]) == {"site", "receivers", "cts"}
    assert all(not m.content.metric_records for m in grid.replies)
    # the complete graph has no consistency stage: the same four secure messages as before
    assert {kind for kind, _ in grid.sent} == {
        "train", "train.secagg_keys", "train.secagg_share", "train.secagg_mask", "train.secagg_unmask",
        "query.final_model"}
    # once masked, an update is no longer kept in the state Flower hands to every later message;
    # its digest is, and it is the one the hospital recorded as released
    for node, pid in grid.nodes.items():
        state = grid.states[node]
        assert "secagg-update" not in state.array_records
        left = state.config_records["secagg-left"]
        released = ReleaseRecord.read(sites4 / f"site-{pid}" / "released.json").releases(RUN_ID, 1)
        assert [r.sha256 for r in released] == [left["sha256"]]


def _drop_once(kind: str, pid: int) -> DropRule:
    return lambda k, p, nth: k == kind and p == pid and nth == 0


@pytest.mark.parametrize(
    ("stage", "expect_alive", "plain_drop"),
    [
        ("train", 3, ("train", 3)),  # site-3 did not train: the session is among the other three
        ("train.secagg_keys", 3, ("train", 3)),  # session formed without site-3
        ("train.secagg_share", 4, None),  # setup restarted, site-3 back with its update (never left)
        ("train.secagg_mask", 3, ("train", 3)),  # site-3 dead: survivors reveal its s-key shares
        ("train.secagg_unmask", 4, None),  # site-3's vector is in; 3 ≥ t unmask without it
    ],
)
def test_a_dropout_at_any_stage_still_gives_the_exact_result(
    sites4: Path, tmp_path: Path, stage: str, expect_alive: int, plain_drop: tuple[str, int] | None
) -> None:
    # act
    secure = _run(sites4, tmp_path / "secure", secure=True, drop=_drop_once(stage, 3))
    plain = _run(sites4, tmp_path / "plain", secure=False, drop=_drop_once(*plain_drop) if plain_drop else None)
    # assert: the round completed (maybe after a restart) and equals plain on the same sites
    record = secure.rounds[0]
    assert len(record.sites_trained) == expect_alive
    assert record.sites_trained == plain.rounds[0].sites_trained
    _assert_same_model(_final(tmp_path / "plain"), _final(tmp_path / "secure"))


def test_after_a_dead_site_the_next_round_uses_a_fresh_session(sites4: Path, tmp_path: Path) -> None:
    secure = _run(sites4, tmp_path / "s", secure=True, drop=_drop_once("train.secagg_mask", 2), rounds=2)
    first, second = secure.rounds
    assert first.secure is not None and second.secure is not None
    assert first.secure.dead == ("site-2",) and len(first.sites_trained) == 3
    assert second.secure.session > first.secure.session
    assert second.sites_trained == ("site-0", "site-1", "site-2", "site-3")


def test_each_round_sets_up_the_next_ones_session_and_then_trains_and_masks_in_one_message(
    sites4: Path, tmp_path: Path
) -> None:
    # act: three rounds, secure and plain, on the same four hospitals
    grid = InProcessGrid(4, {}, RUN_ID)
    secure = _run(sites4, tmp_path / "secure", secure=True, rounds=3, grid=grid)
    released = [ReleaseRecord.read(sites4 / f"site-{pid}" / "released.json") for pid in range(4)]
    _run(sites4, tmp_path / "plain", secure=False, rounds=3)
    # assert: the plain model; a session of its own for each round, but the key stages and the
    # mask request in the first round only
    _assert_same_model(_final(tmp_path / "plain"), _final(tmp_path / "secure"))
    assert len({r.secure.session for r in secure.rounds if r.secure is not None}) == 3
    assert all(r.sites_trained == ("site-0", "site-1", "site-2", "site-3") for r in secure.rounds)
    for pid in range(4):
        assert grid.sent[("train", pid)] == grid.sent[("train.secagg_unmask", pid)] == 3
        assert grid.sent[("train.secagg_mask", pid)] == grid.sent[("train.secagg_keys", pid)] == 1
        assert grid.sent[("train.secagg_share", pid)] == 1
    # rounds 2 and 3: the train reply is the privacy record and what a mask reply holds, nothing else
    # (with round 2's advert for round 3's session); the key shares ride on rounds 1 and 2's unmask
    fused = [m for m in grid.replies if m.metadata.message_type == "train" and m.content.array_records]
    assert len(fused) == 8
    for msg in fused:
        assert set(msg.content.array_records) == {"masked"} and set(msg.content.config_records) == {"privacy", "secagg"}
        assert msg.content.array_records["masked"]["y"].numpy().dtype == np.uint64
        assert set(msg.content.config_records["secagg"]) - {"next_advert"} == {"site", "receivers", "cts"}
    unmasks = [m for m in grid.replies if m.metadata.message_type == "train.secagg_unmask"]
    assert [("next_cts" in m.content.config_records["secagg"]) for m in unmasks] == [True] * 8 + [False] * 4
    # every update left once
    for record in released:
        assert [len(record.releases(RUN_ID, r)) for r in (1, 2, 3)] == [1, 1, 1]


def test_a_hospital_lost_in_a_train_and_mask_round_is_a_dropout_of_the_session(sites4: Path, tmp_path: Path) -> None:
    # prepare: site-3 misses round 2's train request, the one that also asks for its masked vector
    lose = _drop_once_nth("train", 3, 1)
    # act
    secure = _run(sites4, tmp_path / "secure", secure=True, rounds=3, drop=lose)
    released = [ReleaseRecord.read(sites4 / f"site-{pid}" / "released.json") for pid in range(3)]
    plain = _run(sites4, tmp_path / "plain", secure=False, rounds=3, drop=lose)
    # assert: round 2 sums the other three at once (its session is new: site-3's s-key is
    # reconstructed, no update of an earlier round depends on it), so nobody trains round 2 twice;
    # round 3 sets up a session with all four; the model is plain's on the same hospitals
    first, second, third = (r.secure for r in secure.rounds)
    assert first is not None and second is not None and third is not None
    assert second.session != first.session and second.dead == ("site-3",) and second.attempts == 1
    assert secure.rounds[1].sites_trained == plain.rounds[1].sites_trained == ("site-0", "site-1", "site-2")
    assert third.session not in (first.session, second.session) and len(third.alive) == 4
    _assert_same_model(_final(tmp_path / "plain"), _final(tmp_path / "secure"))
    assert all(len(record.releases(RUN_ID, 2)) == 1 for record in released)


def _drop_once_nth(kind: str, pid: int, nth: int) -> DropRule:
    return lambda k, p, n: k == kind and p == pid and n == nth


def test_a_deployed_hospital_refuses_plain_aggregation_unless_it_allows_it(tmp_path: Path) -> None:
    # prepare: a deployment-style node config (data-dir), a plain train request
    from flwr.app import Context, Message, RecordDict

    from client.app import train
    from client.audit import read_entries
    from common.protocol.messages import decode_reply, encode_train_request, error_reason

    cfg = default_run_config(**{"secure-aggregation": False, "warm-start__budget-share": 0.0})
    msg = Message(encode_train_request({}, 1), dst_node_id=5, message_type="train", group_id="1")
    node_config = {"data-dir": str(tmp_path / "dicom"), "state-dir": str(tmp_path), "epsilon-budget": 5.0,
                   "class-names": "normal,lesion", "members": "dicom=" + "ab" * 32}
    ctx = Context(run_id=1, node_id=5, node_config=node_config, state=RecordDict(), run_config=cfg)  # type: ignore[arg-type]
    # act
    reply = decode_reply(train(msg, ctx).content)
    # assert: an error reply with the fixed text, nothing charged, the cause in the hospital's audit log
    assert reply.status == "error" and reply.reason == error_reason("run-refused")
    assert not (tmp_path / "ledger.json").exists()
    (entry,) = read_entries(tmp_path / "audit.jsonl")
    assert entry.status == "error" and "allow-plain-aggregation" in entry.detail


@pytest.fixture(scope="module")
def sites6(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_phantom_sites(tmp_path_factory.mktemp("sites6"), 6, patients_per_site=8)


def test_a_sparse_secagg_graph_gives_the_plain_model_and_routes_by_the_graph(sites6: Path, tmp_path: Path) -> None:
    # prepare: 6 virtual hospitals, secagg.degree = 4 (each masks with 4 of the other 5); site-5 drops
    # after the key setup, so its pairwise masks are removed with its neighbours' s-shares
    drop = _drop_once("train.secagg_mask", 5)
    plain_cfg = {**_config(sites6, tmp_path / "plain", secure=False), "min-nodes": 6}
    secure_cfg = {**_config(sites6, tmp_path / "secure", secure=True), "min-nodes": 6, "secagg.degree": 4}
    grid = InProcessGrid(6, secure_cfg, RUN_ID, drop=drop)

    # act
    fresh_state(sites6)
    secure = run_federation(grid, RunConfig.from_flower(secure_cfg), ServerPaths(tmp_path / "secure"), RUN_ID)  # type: ignore[arg-type]
    fresh_state(sites6)
    plain = run_federation(InProcessGrid(6, plain_cfg, RUN_ID, drop=_drop_once("train", 5)),  # type: ignore[arg-type]
                           RunConfig.from_flower(plain_cfg), ServerPaths(tmp_path / "plain"), RUN_ID)

    # assert: the same model as plain aggregation over the five survivors
    record = secure.rounds[0]
    assert record.secure is not None and record.secure.dead == ("site-5",)
    assert record.sites_trained == plain.rounds[0].sites_trained == tuple(f"site-{i}" for i in range(5))
    _assert_same_model(_final(tmp_path / "plain"), _final(tmp_path / "secure"))
    # and every hospital shared with, and was asked about, its 4 neighbours and itself only
    def replies(kind: str) -> dict[str, ConfigRecord]:
        return {str(m.content.config_records["secagg"]["site"]): m.content.config_records["secagg"]
                for m in grid.replies if m.metadata.message_type == kind}

    adverts = {s: KeyAdvert.from_bytes(cast(bytes, r["advert"])) for s, r in replies("train.secagg_keys").items()}
    graph = CommGraph.of_session(Session(RUN_ID, record.secure.session), adverts, 4)
    assert graph.degree == 4 and not graph.complete
    for site, rec in replies("train.secagg_share").items():
        assert set(cast(list[str], rec["receivers"])) == set(graph.group(site))
    unmasks = replies("train.secagg_unmask")
    assert sorted(unmasks) == list(record.sites_trained)
    # the five survivors (quorum 5 of 6) each signed the survivor set once, with only a signature
    signed = replies("train.secagg_consistency")
    assert sorted(signed) == list(record.sites_trained)
    assert all(set(rec) == {"site", "signature"} for rec in signed.values())
    assert grid.sent[("train.secagg_consistency", 5)] == 0
    for site, rec in unmasks.items():
        assert set(cast(list[str], rec["b_sites"])) == set(graph.group(site)) - {"site-5"}
        assert set(cast(list[str], rec["s_sites"])) == {"site-5"} & graph.neighbours(site)


def test_a_deployed_hospital_refuses_a_sparse_graph_unless_it_opted_in(tmp_path: Path) -> None:
    # prepare: a consortium of 8 pinned members, a run asking each hospital for 4 neighbours
    from client.policy import RunRefused, check_secagg_graph
    from common.config import SiteConfig

    run = RunConfig.from_flower(default_run_config(**{"secagg__degree": 4}))
    members = ",".join(f"site-{i}={i:064x}" for i in range(8))
    node_config: dict[str, bool | int | float | str] = {
        "site-id": "site-0", "data-dir": str(tmp_path / "dicom"), "state-dir": str(tmp_path), "epsilon-budget": 5.0,
        "class-names": "normal,lesion", "members": members}

    # act / assert: by default only the complete graph; an opt-in down to 4, not to 6
    with pytest.raises(RunRefused, match="only the complete graph"):
        check_secagg_graph(run, SiteConfig.from_flower(node_config, run))
    check_secagg_graph(run, SiteConfig.from_flower({**node_config, "min-neighbours": 4}, run))
    with pytest.raises(RunRefused, match="min-neighbours = 6"):
        check_secagg_graph(run, SiteConfig.from_flower({**node_config, "min-neighbours": 6}, run))
    # a degree that is complete for every possible session (>= members - 1) needs no opt-in
    check_secagg_graph(RunConfig.from_flower(default_run_config(**{"secagg__degree": 7})),
                       SiteConfig.from_flower(node_config, run))
