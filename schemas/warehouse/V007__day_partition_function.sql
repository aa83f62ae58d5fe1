-- V007: day partitions created through a function, so the pipeline's role needs
-- no DDL privilege (docs/security.md "Transport and credentials"). The
-- function runs as its owner, the role that applies the migrations (SECURITY
-- DEFINER), and can do one thing only: create the day partition of a
-- partitioned table of this schema for a day from 2000-01-01 up to a week
-- ahead, the horizon of the warehouse writer (transforms/warehouse/writer.py);
-- it returns false, creating nothing, for any other day. Nobody may call it
-- unless granted EXECUTE (apply_migrations grants the pipeline role).
-- Unqualified names on purpose: apply_migrations sets search_path (see V001).
-- The function keeps that schema first and the caller's temporary schema last
-- (SET search_path FROM CURRENT), so a caller's temporary table or type can
-- never stand in for a name the function uses.
SELECT set_config('search_path', format('%I, pg_catalog, pg_temp', current_schema()), true);

CREATE FUNCTION create_day_partition(parent text, day date) RETURNS boolean
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path FROM CURRENT
AS $$
BEGIN
    IF day < date '2000-01-01' OR day > (now() AT TIME ZONE 'UTC')::date + 7 THEN
        RETURN false;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_partitioned_table p JOIN pg_catalog.pg_class c ON c.oid = p.partrelid
                   JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
                   WHERE c.relname = parent AND n.nspname = current_schema()) THEN
        RAISE EXCEPTION 'create_day_partition: % is not a partitioned table of schema %', parent, current_schema()
            USING ERRCODE = 'undefined_table';
    END IF;
    EXECUTE format('CREATE TABLE IF NOT EXISTS %I.%I PARTITION OF %I.%I FOR VALUES FROM (%L) TO (%L)',
                   current_schema(), parent || '_p' || to_char(day, 'YYYYMMDD'), current_schema(), parent,
                   to_char(day, 'YYYY-MM-DD') || ' 00:00:00+00', to_char(day + 1, 'YYYY-MM-DD') || ' 00:00:00+00');
    RETURN true;
END
$$;

REVOKE ALL ON FUNCTION create_day_partition(text, date) FROM PUBLIC;
