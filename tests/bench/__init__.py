"""opsflow's benchmarks: ``make bench`` (``python -m tests.bench``).

Benchmarks, not tests: they measure and report, they do not pass or fail on a
figure, and pytest does not collect them (no ``test_*`` names in here). Each
module is named after what it measures; ``harness`` runs them against a stack
of their own and writes ``results/<UTC timestamp>.json``.
"""
