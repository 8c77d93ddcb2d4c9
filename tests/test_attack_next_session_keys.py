"""Attack: a forged key in the next round's session. Each round sets up the next round's session
alongside it: the adverts come with the masked vectors, and the unmask request hands them back so
that each hospital sends its key shares with its unmask reply. A server that puts an advert signed
with its own key under a hospital's name among them (to hold that "hospital's" mask keys) gets
nothing from that request: every hospital checks each advert against the membership it pinned
before it answers, and refuses the whole request, the unmask shares of the round included. (The
round then restarts with new sessions; the updates that already left masked are trained again
and charged, as after any failure once updates have left.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from common.protocol.messages import decode_reply, error_reason
from common.secagg import SecAggClient, Session, SiteIdentity
from server.secagg import SecureRounds
from tests.attacker import RUN_ID, Attack, write_sites

SITES = ("site-0", "site-1", "site-2", "site-3")


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_sites(tmp_path_factory.mktemp("next-keys"), [5, 5, 5, 5])


def test_a_forged_advert_for_the_next_session_is_refused_with_the_unmask_request(
    sites: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # prepare: the server swaps site-2's advert for the next session, once, for one it signed itself
    attack = Attack(sites, tmp_path, 4)
    honest = SecureRounds._next_share_fields
    forged_session: list[int] = []

    def forge(self: SecureRounds, responders: set[str]) -> dict[str, object]:
        fields = honest(self, responders)
        if not forged_session and self.next is not None:
            forged_session.append(self.next.setup_id)
            _, forged = SecAggClient.start(SiteIdentity.generate("site-2"), Session(RUN_ID, self.next.setup_id))
            fields["next_adverts"] = [forged.to_bytes() if self.next.adverts[s].site_id == "site-2"
                                      else self.next.adverts[s].to_bytes() for s in sorted(self.next.adverts)]
        return fields

    monkeypatch.setattr(SecureRounds, "_next_share_fields", forge)

    # act: a round that also sets up the next one
    new_arrays, record = attack.driver.run_round(attack.nodes, attack.arrays, 1, prepare_next=True)

    # assert: the forged request got a refusal from every hospital (no share of the round left);
    # the round restarted with new sessions and completed; the forged session was never used
    first_unmask = attack.replies("train.secagg_unmask")[:4]
    assert all(decode_reply(m.content).status == "error" for m in first_unmask)
    assert all(decode_reply(m.content).reason == error_reason("secagg-abort") for m in first_unmask)
    assert new_arrays is not None and record.secure is not None and record.secure.attempts == 2
    assert record.secure.session != forged_session[0] and attack.driver.setup_id != forged_session[0]
    for site in SITES:
        refusals = [e for e in attack.audit(site) if e.status == "error"]
        assert len(refusals) == 1 and refusals[0].action == "train.secagg_unmask"
        assert "KeySwapDetected" in refusals[0].detail
