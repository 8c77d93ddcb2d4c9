"""Empirical privacy audit of a simulated federation (``medsynth audit``, issue 16).

Attacks that turn what a run releases into ε lower bounds, to set against the claimed ε.
``one_run``: the statistics of the one-run audit (Steinke, Nasr, Jagielski, "Privacy auditing
with one (1) training run", NeurIPS 2023): guesses on m canaries → an ε lower bound.
``canaries``: gradient canaries in the in-process DP-SGD federation, scored from the per-round
global models the server sees. ``membership``: membership inference on the released G, D and
synthetic set (D's logit, GAN-Leaks, DOMIAS) with AUC, TPR at low FPR and an ε bound;
``mia_runs``: its grid. ``run``: the audit runs, the attacks' findings, ``audit.json``.
Simulation only: nothing here is imported by a hospital's or the server's code.
"""
