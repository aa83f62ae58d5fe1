-- V002: demo account reference data for the enrichment side input.
-- acct-00001 .. acct-00600, the ids runners/generator.py gives the accounts of
-- its first 1000 users, with deterministic attributes. Every 97th id
-- (acct-00097, acct-00194, ... acct-00582) is left out on purpose so the
-- pipeline's "missing reference yields defaults" path runs in every demo.
-- Real deployments load accounts from their CRM with upsert_accounts();
-- rows that already exist are left alone here.
INSERT INTO accounts (account_id, plan, tier, industry, company_size, updated_at)
SELECT
    format('acct-%s', lpad(n::text, 5, '0')),
    p.plan,
    CASE p.plan
        WHEN 'enterprise' THEN 'enterprise'
        WHEN 'team' THEN 'smb'
        WHEN 'pro' THEN 'smb'
        ELSE 'self_serve'
    END,
    (ARRAY['software', 'retail', 'finance', 'healthcare', 'education', 'manufacturing', 'media'])[1 + n % 7],
    GREATEST(1, (CASE p.plan
        WHEN 'free' THEN 3 WHEN 'starter' THEN 10 WHEN 'pro' THEN 40 WHEN 'team' THEN 120 ELSE 2000
    END) * (3 + (n * 31) % 28) / 10),
    timestamptz '2025-01-01 00:00:00+00'
FROM generate_series(1, 600) AS n
CROSS JOIN LATERAL (
    -- Plan mix 45/20/18/12/5 %, like the generator's, from a fixed hash of n.
    SELECT CASE
        WHEN (n * 7919) % 100 < 45 THEN 'free'
        WHEN (n * 7919) % 100 < 65 THEN 'starter'
        WHEN (n * 7919) % 100 < 83 THEN 'pro'
        WHEN (n * 7919) % 100 < 95 THEN 'team'
        ELSE 'enterprise'
    END AS plan
) AS p
WHERE n % 97 <> 0
ON CONFLICT (account_id) DO NOTHING;
