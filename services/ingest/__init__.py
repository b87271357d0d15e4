"""The ingest service: producers outside opsflow publish events over HTTP.

``POST /orders``, ``POST /events/<event type>`` and ``POST /events:batch`` take
event bodies as JSON (each event without its envelope), check them against
their contracts, and write them to their topics of record through the producer
SDK (``opsflow.producer``), answering 202 only once the broker acknowledged
them. Producers authenticate with API keys (``opsflow keys create``); an
``Idempotency-Key`` header makes a retry safe. Run it with
``python -m services.ingest``; its settings are in ``services.ingest.config``.
"""
