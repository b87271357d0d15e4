"""The projector: one process keeping every read model current from the topics.

Several may run side by side (for availability, not throughput): every batch
moves its projection's stored position fenced (``opsflow.projections.positions``),
so each is written by one of them, and the others go on when one dies.
"""
