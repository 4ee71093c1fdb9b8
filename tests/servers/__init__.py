"""Throwaway real servers for tests: PostgreSQL, Postfix, NSD, Dovecot, an SMTP sink and uvicorn.

Each helper starts one real server on 127.0.0.1 on a free port, with all of its configuration and
state in a private temporary directory (nothing under ``/etc`` is touched), waits for it by polling
with a deadline, and stops it by its PID (killing it if it will not stop). ``tests/conftest.py``
wraps them in pytest fixtures; ``tests/run.sh`` installs the Debian packages they need.
"""
