"""The `mailgate` sub-commands of gateway.imap."""

from __future__ import annotations

import argparse


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register this package's sub-commands on the `mailgate` parser."""
