"""opsflow's own schema registry: the Confluent Schema Registry API for Avro, stored in PostgreSQL.

Run it with ``python -m opsflow.registry``; build it in-process with
``opsflow.registry.app.create_app``.
"""
