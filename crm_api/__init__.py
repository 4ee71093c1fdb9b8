"""The bundled CRM: a small FastAPI + SQLModel application with its own database that keeps
contacts, the emails the gateway logs, and the sharing rules that decide who may read them. It is
the reference implementation of the CRM contract in the architecture notes, reached by the gateway
only over HTTP, and so imports nothing from ``gateway`` or ``hooks``."""
