"""Attack: learning a hospital's patient count from what it sends. ε after a round used to be a
function of q = batch / patients (the server inverted it to P = 737), and the sum carried Σω,
the consortium's exact patient total, and Σω·loss on real images. Now the sample rate is a public
run parameter, the aggregation weight is the public constant 1 and the losses that leave are
computed on generated rows only: hospitals of different sizes send identical privacy records,
and the sum's weight slot is the number of contributors."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.protocol.secagg import quantizer_for
from common.weights import PUBLIC_WEIGHT
from tests.attacker import Attack, write_sites

PATIENTS = [4, 13, 7]


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_sites(tmp_path_factory.mktemp("sizes"), PATIENTS)


def test_hospitals_of_different_sizes_send_identical_privacy_records_and_sum_no_patient_count(
    sites: Path, tmp_path: Path
) -> None:
    # prepare: three hospitals with 4, 13 and 7 patients; σ calibrated to each one's budget
    # (with q = B / P their σ and ε differed even between 1000 and 1001 patients)
    attack = Attack(sites, tmp_path, 3, dp__calibrate=True)

    # act: a round; the server decodes the sum as an attacker would
    privacy, node_of = attack.driver.train(attack.nodes, attack.arrays, 1, attack.failures)
    server = attack.driver._session_for(node_of, attack.failures)
    total, alive = attack.driver._masked_round(server, 1, attack.failures)
    quantizer = quantizer_for(attack.run, attack.driver.layout, 1)
    _, weight, _ = attack.driver.layout.unpack_sum(quantizer.decode_sum(total, len(alive)))

    # assert: the records differ only in the site id; Σω = number of contributors
    records = [{k: v for k, v in vars(r).items() if k != "site_id"} for r in privacy.values()]
    assert len(records) == 3 and records[0] == records[1] == records[2]
    assert records[0]["status"] == "ok" and records[0]["epsilon"] > 0
    assert weight == pytest.approx(len(alive) * PUBLIC_WEIGHT, abs=1e-9)
    sizes = [attack.ledger(s).entries[-1].sample_rate for s in ("site-0", "site-1", "site-2")]
    assert sizes == [attack.run.privacy.sample_rate] * 3  # the public q was charged everywhere
