"""``opsflow demo``: realistic orders sent through the ingest API and followed through
every step of the workflow, ending in a summary of where they ended and how long each
step took.

- ``orders``: seeded order generators (the demo's scenario mix, and the varied
  samples the benchmarks encode).
- ``sender``: the ingest API client that sends them in batches, at a rate if asked.
- ``tracker``: reads the topics of record and keeps each order's state.
- ``run``: one run, from settings to ``Summary``; ``report`` draws it for people.

The modules are imported one by one (``from services.demo.orders import ...``),
so code that only needs orders does not load the HTTP and Kafka clients.
"""
