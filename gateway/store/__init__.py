"""The durable store: tables, migrations, the queue and its group-committed writer."""
