"""The console as the ``mailingest console`` command runs it: the workers' context (the
same ledger, broker and mailboxes), the door from the settings, the index checked."""

from __future__ import annotations

import logging

from starlette.applications import Starlette

from mailingest.application.services import build_context
from mailingest.config.settings import Settings
from mailingest.console.access import Gate
from mailingest.console.app import build_app

log = logging.getLogger(__name__)


def build(settings: Settings, *, reindex: bool = False) -> Starlette:
    """The application for these settings (``require("console")`` already passed)."""
    ctx = build_context(settings)
    # records written before the console's index existed are indexed once, now
    indexed = ctx.ledger.reindex(force=reindex)
    if indexed:
        log.info("console: indexed %d mail(s) recorded before the index existed", indexed)
    assert settings.console_secret is not None  # required by the "console" group
    gate = Gate(
        users=settings.console_users,
        trusted_header=settings.console_trusted_header,
        secret=settings.console_secret.reveal().encode("utf-8"),
        client=ctx.redis,
    )
    return build_app(ctx, gate)
