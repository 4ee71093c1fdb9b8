"""IMAP sync: connect reps' and shared mailboxes and log the mail that involves contacts."""
