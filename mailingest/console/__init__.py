"""``mailingest console``: the operator's pages in the browser.

* :mod:`.access`: who may come in (HTTP basic auth against the users file, or the
  header an authenticating proxy sets), the CSRF tokens of every action, the security
  headers, failed logins counted in Redis;
* :mod:`.views`: what each page shows, read from the ledger (one round trip for the
  live parts) as plain data, tested without a browser;
* :mod:`.app`: the Starlette application: routes, templates (``templates/``), the
  files it serves (``static/``: htmx, shipped here, and the style sheet).

Actions go through :mod:`mailingest.application.actions`, the functions the command
line uses; each is confirmed on a page of its own, recorded in the audit log and safe
to send twice.
"""
