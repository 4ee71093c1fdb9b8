"""The SMTP doors: aiosmtpd handlers over a pure policy, and their listeners."""
