"""Benchmark: one hospital's secure-aggregation work on the complete graph against SecAgg+'s sparse one.

Protocol level only (``common.secagg``, no Flower, no training): for each n, n sites advertise
keys; one site (``site-0``) then runs the key setup (``share_keys``: verify n signed adverts,
derive the graph, Shamir-share its mask key among its neighbourhood) and masks a vector of the
app's update length (``mask``: one X25519 agreement and one ChaCha20 stream per neighbour, plus
its self-mask stream and the shares of its self-mask seed). Both are timed on the complete graph
(``secagg.degree = 0``) and on the k-regular graph of Bell et al., CCS 2020, with k the degree
``medsynth simulate --secagg-degree auto`` picks (ceil(3·log2 n)) unless ``--degree`` says
otherwise. The other sites' setup is not run (it is the same work at every site), so the
measurement costs one site's work per configuration, not n.

Reported per configuration: neighbours k, the median (over ``--repeats``) wall time of one
``mask`` call and of one ``share_keys`` call, and the ratio complete / sparse; on the sparse graph
also the per-round consistency work (``common.secagg.consistency``: signing the survivor set and
verifying the quorum of ⌊2n/3⌋ + 1 signatures an unmask request carries, all n sites surviving),
which the complete graph does not run. One untimed
warm-up configuration (the largest n, complete graph) runs first (the first large allocations of a
process page-fault and made the first configuration look 2-3x slower). Nothing is asserted;
timings depend on the machine and its load (printed).

    python -m simulation.bench_secagg_graph [--sites 100 500] [--length N] [--degree K] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import dataclass

import numpy as np

from common.secagg import (
    COMPLETE,
    Roster,
    SecAggClient,
    Session,
    SiteIdentity,
    consistency_quorum,
    default_threshold,
    effective_degree,
    survivors_payload,
)
from common.secagg.consistency import check_certificate
from common.secagg.identity import ed25519_valid
from simulation.run_options import auto_degree

SESSION = Session(run_id=1, setup_id=1)


@dataclass(frozen=True)
class Timing:
    """One (n, degree) configuration: k actually used and median seconds of one site's calls."""

    sites: int
    degree: int  # effective k
    share_keys_s: float
    mask_s: float
    consistency_s: float | None  # sign the survivor set + verify the quorum; None on the complete graph


def app_update_length() -> int:
    """The update vector length of the app's default model (``[tool.flwr.app.config]``)."""
    from common.config import run_config
    from common.models import build_models
    from common.weights import UpdateLayout, model_arrays

    netG, netD = build_models(run_config().model, seed=0)
    return UpdateLayout.of(model_arrays(netG, netD)).size


def measure(sites: int, degree: int, length: int, repeats: int) -> Timing:
    """Median wall time of site-0's ``share_keys`` and ``mask`` among ``sites`` advertised sites."""
    identities = {f"site-{i}": SiteIdentity.generate(f"site-{i}") for i in range(sites)}
    roster = Roster({s: i.public_key() for s, i in identities.items()})
    k = effective_degree(sites, degree)
    t = default_threshold(k + 1)
    x = np.random.default_rng(0).integers(0, 2**64, length, dtype=np.uint64)  # the benchmark's input only
    alive = sorted(identities)
    payload = survivors_payload(SESSION, 1, alive)
    quorum = {s: identities[s].sign(payload) for s in alive[: consistency_quorum(sites)]}
    setup_s, mask_s, consistency_s = [], [], []
    for _ in range(repeats):
        started = {s: SecAggClient.start(identity, SESSION) for s, identity in identities.items()}
        adverts = {s: advert for s, (_, advert) in started.items()}
        me = started["site-0"][0]
        ed25519_valid.cache_clear()  # one hospital's own checks: none remembered from the repeat before
        t0 = time.perf_counter()
        me.share_keys(adverts, roster, t, degree=degree, min_degree=degree)
        t1 = time.perf_counter()
        me.mask(1, x)
        t2 = time.perf_counter()
        if k < sites - 1:
            me.sign_survivors(1, alive)
            check_certificate(roster, SESSION, 1, alive, quorum, alive)
        t3 = time.perf_counter()
        setup_s.append(t1 - t0)
        mask_s.append(t2 - t1)
        consistency_s.append(t3 - t2)
    return Timing(sites, k, statistics.median(setup_s), statistics.median(mask_s),
                  statistics.median(consistency_s) if k < sites - 1 else None)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sites", type=int, nargs="+", default=[100, 500], help="consortium sizes n")
    p.add_argument("--length", type=int, default=None, help="vector length (default: the app's update length)")
    p.add_argument("--degree", type=int, default=None,
                   help="sparse degree k (default: ceil(3·log2 n), what `simulate --secagg-degree auto` uses)")
    p.add_argument("--repeats", type=int, default=3, help="calls per configuration (median reported)")
    args = p.parse_args(argv)
    length = args.length or app_update_length()
    print(f"vector length {length}, {args.repeats} repeats, load average {os.getloadavg()[0]:.2f}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    measure(max(args.sites), COMPLETE, length, 1)  # warm-up (untimed): the first large allocations page-fault
    print(f"{'n':>5} {'graph':>9} {'k':>4} {'share_keys s':>13} {'mask s':>9} {'mask ratio':>11} "
          f"{'consistency s':>14}")
    for n in args.sites:
        sparse_degree = args.degree if args.degree is not None else max(auto_degree(n), 4)
        complete = measure(n, COMPLETE, length, args.repeats)
        sparse = measure(n, sparse_degree, length, args.repeats)
        for label, timing in (("complete", complete), ("sparse", sparse)):
            ratio = complete.mask_s / timing.mask_s
            check = "-" if timing.consistency_s is None else f"{timing.consistency_s:.3f}"
            print(f"{n:>5} {label:>9} {timing.degree:>4} {timing.share_keys_s:>13.3f} {timing.mask_s:>9.3f} "
                  f"{ratio:>10.1f}x {check:>14}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
