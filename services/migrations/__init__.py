"""The order workflow's own tables: migrations applied after opsflow's (``opsflow.db``)."""
