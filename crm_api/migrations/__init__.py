"""The CRM's Alembic migrations (a package so that ``env.py`` ships with ``crm_api``); run them
with ``crm_api.db.migrate`` or ``mailgate crm migrate``, never by hand-written DDL."""
