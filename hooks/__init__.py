"""Hooks: what the gateway tells CRMs (contact matching, events, signed webhooks)."""
