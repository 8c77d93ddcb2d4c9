"""The ``medsynth`` command: a thin dispatcher over each side's own command module.

``medsynth.cli`` builds the top-level parser; the commands live beside their users:
``client/cli.py`` (the hospital), ``server/cli.py`` (the consortium's server) and
``simulation/cli.py`` (simulated federations, evaluation, export).
"""
