"""The application: the pipeline's steps and what runs them.

Steps (:mod:`.pipeline`) read through the adapters, decide with the core, write back.
They are run by Celery (:mod:`.celery_app`, :mod:`.tasks`), by ``poll-once``
(:mod:`.poll_once`), woken by ``watch`` (:mod:`.watch`), and driven from the
command line (:mod:`.cli`). :mod:`.services` builds the adapters for every command.
"""
