"""Empirical privacy audits (simulation only): attacks that turn what a run releases into ε lower bounds."""
