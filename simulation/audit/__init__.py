"""Empirical privacy audit of a simulated federation (``medsynth audit``, issue 16).

``one_run``: the statistics of the one-run audit (Steinke, Nasr, Jagielski, "Privacy auditing
with one (1) training run", NeurIPS 2023): guesses on m canaries → an ε lower bound.
``canaries``: gradient canaries in the in-process DP-SGD federation, scored from the per-round
global models the server sees. ``run``: the audit runs, the attacks' findings, ``audit.json``.
Simulation only: nothing here is imported by a hospital's or the server's code.
"""
