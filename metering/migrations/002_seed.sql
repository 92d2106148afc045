-- Seed data of contract sections 2 and 4: four plans, 36 plan_features rows, 7 event types.

INSERT INTO plans (plan, rank) VALUES ('free', 0), ('pro', 1), ('business', 2), ('enterprise', 3);

INSERT INTO plan_features (plan, feature_key, limit_value) VALUES
    ('free', 'max_records', 100),            ('pro', 'max_records', 10000),
    ('business', 'max_records', 100000),     ('enterprise', 'max_records', -1),
    ('free', 'max_api_calls_per_month', 1000),        ('pro', 'max_api_calls_per_month', 100000),
    ('business', 'max_api_calls_per_month', 1000000), ('enterprise', 'max_api_calls_per_month', -1),
    ('free', 'max_automations', 10),         ('pro', 'max_automations', 1000),
    ('business', 'max_automations', 10000),  ('enterprise', 'max_automations', -1),
    ('free', 'max_storage_gb', 1),           ('pro', 'max_storage_gb', 10),
    ('business', 'max_storage_gb', 100),     ('enterprise', 'max_storage_gb', -1),
    ('free', 'max_mau', 100),                ('pro', 'max_mau', 1000),
    ('business', 'max_mau', 10000),          ('enterprise', 'max_mau', -1),
    ('free', 'max_schedules', 10),           ('pro', 'max_schedules', 1000),
    ('business', 'max_schedules', 10000),    ('enterprise', 'max_schedules', -1),
    ('free', 'max_ai_tokens_per_month', 10000),          ('pro', 'max_ai_tokens_per_month', 1000000),
    ('business', 'max_ai_tokens_per_month', 10000000),  ('enterprise', 'max_ai_tokens_per_month', -1),
    ('free', 'max_seats', 1),                ('pro', 'max_seats', 5),
    ('business', 'max_seats', 50),           ('enterprise', 'max_seats', -1);

INSERT INTO plan_features (plan, feature_key, limit_value, flags) VALUES
    ('free', 'features', NULL, '{"api_access": false, "advanced_analytics": false, "sso": false,
        "custom_branding": false, "priority_support": false, "dedicated_support": false}'),
    ('pro', 'features', NULL, '{"api_access": true, "advanced_analytics": true, "sso": false,
        "custom_branding": false, "priority_support": false, "dedicated_support": false}'),
    ('business', 'features', NULL, '{"api_access": true, "advanced_analytics": true, "sso": true,
        "custom_branding": true, "priority_support": true, "dedicated_support": false}'),
    ('enterprise', 'features', NULL, '{"api_access": true, "advanced_analytics": true, "sso": true,
        "custom_branding": true, "priority_support": true, "dedicated_support": true}');

INSERT INTO event_types (event_type, aggregation, limit_key, lifetime, limit_unit, description) VALUES
    ('api_call',          'sum',            'max_api_calls_per_month', false, 1, 'sum of quantity per month'),
    ('record_created',    'sum',            'max_records',             true,  1, 'sum of quantity, limit over the lifetime'),
    ('automation_run',    'sum',            'max_automations',         false, 1, 'sum of quantity per month'),
    ('schedule_executed', 'sum',            'max_schedules',           false, 1, 'sum of quantity per month'),
    ('ai_tokens_used',    'sum',            'max_ai_tokens_per_month', false, 1, 'sum of quantity per month'),
    ('storage_used',      'gauge_latest',   'max_storage_gb',          false, 1000000000, 'bytes in use; latest reading by occurred_at'),
    ('user_active',       'distinct_users', 'max_mau',                 false, 1, 'exact distinct user_id per period');
