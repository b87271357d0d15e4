"""The refund workflow's tables, applied after opsflow's own (``NNNN_name.sql``)."""
