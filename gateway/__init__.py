"""Mailgate: a self-hosted mail gateway that logs customer email into a CRM."""
