"""The edges: the only modules that talk to the outside world.

IMAP (:mod:`.imap`), Alloy (:mod:`.alloy`), Redis (:mod:`.ledger`, :mod:`.keys`,
:mod:`.rate_limit`, :mod:`.senders`, :mod:`.oauth`) and the encryption of staged
bytes (:mod:`.encryption`). Each is a small interface the application drives.
"""
