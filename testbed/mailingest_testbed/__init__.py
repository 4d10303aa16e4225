"""mailingest's test bed: what the demo, the tests and the benchmark run against.

Not part of the product: the Alloy sandbox, the OAuth sandbox, the private servers
(Redis, Dovecot, pymap, Celery processes), the sample mails and the demo. It is its
own distribution (``testbed/pyproject.toml``); ``./dev demo`` and ``./dev test``
install it beside mailingest.
"""
