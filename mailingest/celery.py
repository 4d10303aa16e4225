"""Where ``celery -A mailingest`` (and ``-A mailingest.celery``) finds the Celery app.

The app itself lives in :mod:`mailingest.application.celery_app`; this name is kept
because Celery looks for ``<package>.celery`` and the deployment files use it.
"""

from mailingest.application.celery_app import app

__all__ = ["app"]
