"""``python -m crm_api …``: the ``mailgate crm`` commands without the gateway installed."""

from crm_api.cli import main

raise SystemExit(main())
