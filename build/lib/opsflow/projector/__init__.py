"""The projector: one process keeping every read model current from the topics."""
