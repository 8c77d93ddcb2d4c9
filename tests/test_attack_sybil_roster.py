"""Attack: a Sybil roster. The operator builds the roster, so it can list keys it holds under
other hospitals' names: two such entries plus one real hospital pass every protocol check and
the "sum" is that hospital's update. Each hospital pins the consortium's membership (site ids
and signing-key fingerprints) itself; a roster that differs is refused before anything is
trained, charged or sent."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.protocol.messages import error_reason
from common.secagg import Roster, SiteIdentity
from tests.attacker import Attack, write_sites


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_sites(tmp_path_factory.mktemp("sybil"), [5, 5, 5])


def test_a_roster_with_operator_keys_is_refused_before_anything_is_charged_or_sent(sites: Path, tmp_path: Path) -> None:
    # prepare: the operator's roster keeps site-0's real key and puts its own under site-1 and site-2
    attack = Attack(sites, tmp_path, 3)
    real = Roster.load(sites / "roster.json")
    honest_copy = (sites / "roster.json").read_bytes()
    sybils = {s: SiteIdentity.generate(s).public_key() for s in ("site-1", "site-2")}
    Roster({"site-0": real.keys["site-0"], **sybils}).save(sites / "roster.json")
    try:
        # act: a round (train, then the key setup the driver would run) against that roster
        privacy, _ = attack.driver.train(attack.nodes, attack.arrays, 1, attack.failures)
        with pytest.raises(Exception, match="hospitals available"):
            attack.driver.setup({"site-0": attack.node("site-0")}, attack.failures)
    finally:
        (sites / "roster.json").write_bytes(honest_copy)

    # assert: every hospital refused with the fixed text; nothing charged, no key advertised
    assert privacy == {}
    assert [f.split(": ", 2)[2] for f in attack.failures if f.startswith("train:")] == \
        [error_reason("membership")] * 3
    assert [f.split(": ", 2)[2] for f in attack.failures if f.startswith("keys:")] == [error_reason("membership")]
    for site in ("site-0", "site-1", "site-2"):
        assert not (attack.state(site) / "ledger.json").exists()
        entries = attack.audit(site)
        assert entries and all(e.status == "error" and "MembershipMismatch" in e.detail for e in entries)
    assert "site-1" in attack.audit("site-0")[0].detail  # the officer sees which entry differs


def test_the_honest_roster_passes_the_pins(sites: Path, tmp_path: Path) -> None:
    # prepare: the same consortium, the roster the hospitals pinned (the control of the test above)
    attack = Attack(sites, tmp_path, 3)
    # act
    attack.driver.setup({s: attack.node(s) for s in ("site-0", "site-1", "site-2")}, attack.failures)
    # assert
    assert attack.failures == [] and attack.driver.server is not None
    assert attack.driver.server.participants == ("site-0", "site-1", "site-2")
