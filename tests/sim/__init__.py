"""Deterministic simulation of mailingest: real steps, real servers, a scheduler in charge.

The scheduler (:mod:`.scheduler`) runs the pipeline's real step functions in threads, one
at a time, against a real Redis, the Alloy sandbox and Dovecot; the hooks (:mod:`.hooks`)
make every Redis command, HTTP call and IMAP command a checkpoint where a seeded RNG picks
what happens next. :mod:`.checker` then judges the end state. ``python -m tests.sim``.
"""
