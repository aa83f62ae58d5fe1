-- V004: drift detections of the online models (transforms/online_models.py,
-- schemas/drift_event.avsc). Aggregate statistics only, never per-user data.
-- drift_id is derived from the detection itself (model, version, metric, event
-- time, window), so a replayed or retried detection is the same row.
CREATE TABLE drift_events (
    drift_id      uuid             PRIMARY KEY,
    model_name    text             NOT NULL,
    model_version text             NOT NULL,
    detector      text             NOT NULL,
    metric        text             NOT NULL,
    value         double precision NOT NULL,
    threshold     double precision,
    window_events bigint           NOT NULL DEFAULT 0,
    action        text             NOT NULL DEFAULT 'none',
    detected_at   timestamptz      NOT NULL
);

CREATE INDEX drift_events_model_detected_idx ON drift_events (model_name, detected_at);
