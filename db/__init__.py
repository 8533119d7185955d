"""SQL storage: schema, engine and sessions, migrations and queries."""
