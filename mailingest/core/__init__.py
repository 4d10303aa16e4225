"""The pure core: mail bytes -> screened documents, and the pipeline's decisions.

Nothing here does I/O or imports an I/O library (redis, imapclient, httpx, celery);
``tests/test_layout.py`` proves it. Everything here is tested without servers.
"""
