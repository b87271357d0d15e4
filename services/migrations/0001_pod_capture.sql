-- formerly opsflow 0003
-- Pod-capture's tables: a database migrated before they moved here has them from
-- opsflow's own migration 0003, and this one is then recorded, not run.
-- pod-capture: which orders are dispatched, which proofs of delivery were
-- captured, and which wait for their dispatch. As in 0001, the connection's
-- search_path decides the schema.

-- The read model of dispatch.executed: one row per accepted carrier booking,
-- written by the pod-capture runtime service (`opsflow run services.pod_capture`)
-- with ON CONFLICT DO NOTHING, so a replayed or retried event changes nothing
-- and the first record of a booking wins. The webhook matches each POD against
-- it: the booking must be known, for the same order and carrier. It is a
-- projection of the dispatch topic: dropping it and replaying rebuilds it.
CREATE TABLE pod_capture_dispatches (
    booking_reference text PRIMARY KEY,
    order_id text NOT NULL,
    carrier text NOT NULL,
    dispatch_id text NOT NULL,
    dispatched_event_id uuid NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now()
);

-- A POD for an unknown booking is answered with the booking this order was
-- dispatched under, if any.
CREATE INDEX pod_capture_dispatches_order_id ON pod_capture_dispatches (order_id);

-- One row per captured POD (per booking): a repeat is answered from it and
-- emits nothing. The webhook takes a transaction-scoped advisory lock on the
-- booking, looks the row up, writes pod.captured to Kafka (waiting for the
-- broker's acknowledgement) and inserts the row in that one transaction: a
-- concurrent repeat waits on the lock, then replays the row; a failed write
-- leaves no row. If the process dies between the acknowledgement and the
-- commit, the carrier's retry writes pod.captured again with the same event
-- id (derived from the carrier and booking), which consumers drop as a repeat.
-- response is the JSON answer exactly as first sent, so a replay is identical.
CREATE TABLE pod_capture_pods (
    booking_reference text PRIMARY KEY,
    event_id uuid NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    response text NOT NULL
);

-- PODs refused because their booking was unknown (404, pod.rejected with
-- UNKNOWN_BOOKING): the carrier can know a booking before opsflow does, e.g.
-- when dispatch dies between booking and emitting dispatch.executed and only
-- emits it after its restart. The webhook captures a kept POD as soon as its
-- booking shows up in pod_capture_dispatches (the same capture, with the same
-- event id, as if the POD had arrived then), deletes the row in the capture's
-- transaction, and drops rows kept longer than POD_UNMATCHED_KEEP_S.
CREATE TABLE pod_capture_unmatched (
    booking_reference text PRIMARY KEY,
    producer text NOT NULL,
    pod text NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now()
);
