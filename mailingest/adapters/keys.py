"""Every Redis key mailingest uses, named in one place.

    mailingest:mail:<mail id>            hash   the ledger record of one mail
    mailingest:doc:<mail id>:<index>     hash   one document of that mail
    mailingest:done:<mail id>            set    indexes of its documents Alloy confirmed
    mailingest:raw:<mail id>             string the mail's bytes, staged with a TTL
    mailingest:blob:<mail id>:<index>    string one document's bytes, staged with a TTL
    mailingest:state:<state>             set    mail ids in that state (for status)
    mailingest:unfiled                   set    decided mails not yet moved out of the inbox
    mailingest:index:<state>[:<inbox>[:<reason kind>]]   zset   the mails in that state
                                         (of that inbox, with a reason of that kind),
                                         scored by when each was recorded: the console's
                                         pages, kept by the same scripts as the state sets
    mailingest:index-version             string which build of that index the ledger has
    mailingest:history:<mail id>         stream every move of the mail: from, to, at, by,
                                         attempt, reason (capped)
    mailingest:find:<field>:<value>      set    the mails whose sender, message_id, entity or
                                         document token (field ``token``) is that value
                                         (lower case): the console's search
    mailingest:audit:<mail id>           list   what operators did to it in the console
                                         (who, what, when; capped), newest first
    mailingest:audit                     list   the same for every mail, newest first (capped)
    mailingest:console:done:<nonce>      string an action already carried out (a form sent
                                         twice is answered with the first outcome)
    mailingest:console:logins:<who>      string failed logins in the last window
    mailingest:watermark:<inbox>:<folder>:<uidvalidity>   highest UID recorded
    mailingest:slot:<entity>:<fingerprint> hash the one Alloy document for that document,
                                         shared by every copy of its mail: token,
                                         attempt in doubt, uploaded, refused
    mailingest:unfetchable:<inbox>:<uidvalidity>:<uid>     polls that got no body for it
    mailingest:lock:poll:<inbox>         lock   single flight of one inbox's poll
    mailingest:lock:step:<step>:<mail id>[:<index>]   lock   single flight of one step
    mailingest:poll:<inbox>              hash   last poll: when, found, error, last success
    mailingest:repoll:<inbox>            string a poll was asked for while one ran: poll again
    mailingest:token:<document token>    string which slot owns an Alloy token
    mailingest:doubt:<entity>:<kind>     zset   slots whose describe of a document of this
                                         name, extension and type may still be committed
                                         (score: when it was begun)
    mailingest:senders                   hash   e-mail -> entity (the CLI's directory)
    mailingest:ratelimit:alloy           hash   the token bucket all workers share
    mailingest:ratelimit:alloy:pause     string after a 429: until when every worker holds
                                         its Alloy requests (ms on Redis' clock)
    mailingest:ratelimit:alloy:stats     hash   the last minute, per second: requests, delayed,
                                         ms waited, deferred, 429s (for status)
    mailingest:oauth:<inbox>             hash   OAuth2 access/refresh tokens (sealed), expiry
    mailingest:lock:oauth:<inbox>        lock   single flight of one inbox's token refresh

A mail id is ``<inbox>/<folder, %-quoted>/<uidvalidity>/<uid>``: readable in
Flower and in ``mailingest status``, and free of anything sensitive.
"""

from __future__ import annotations

import hashlib
from urllib.parse import quote

NS = "mailingest"
SENDERS = f"{NS}:senders"
UNFILED = f"{NS}:unfiled"
# mails filed with parts refused (on_refused_part = "skip"), newest last: status lists them
PARTLY_FILED = f"{NS}:partly-filed"


def mail(mail_id: str) -> str:
    return f"{NS}:mail:{mail_id}"


def document(mail_id: str, index: int) -> str:
    return f"{NS}:doc:{mail_id}:{index}"


def done(mail_id: str) -> str:
    return f"{NS}:done:{mail_id}"


def raw(mail_id: str) -> str:
    return f"{NS}:raw:{mail_id}"


def blob(mail_id: str, index: int) -> str:
    return f"{NS}:blob:{mail_id}:{index}"


def state(name: str) -> str:
    return f"{NS}:state:{name}"


INDEX = f"{NS}:index:"  # + <state>[:<inbox>[:<kind>]]
INDEX_VERSION = f"{NS}:index-version"  # which build of the index the ledger has


def index(state: str, inbox: str = "", kind: str = "") -> str:
    return INDEX + ":".join(part for part in (state, inbox, kind) if part)


def history(mail_id: str) -> str:
    return f"{NS}:history:{mail_id}"


FIND = f"{NS}:find:"  # + <field>:<value, lower case>


def find(field: str, value: str) -> str:
    return f"{FIND}{field}:{ascii_lower(value)}"


def ascii_lower(value: str) -> str:
    """Lower case as the ledger's Lua scripts make it (string.lower: A-Z only)."""
    return value.translate(_ASCII_LOWER)


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


AUDIT = f"{NS}:audit"


def audit(mail_id: str) -> str:
    return f"{AUDIT}:{mail_id}"


def console_done(nonce: str) -> str:
    return f"{NS}:console:done:{nonce}"


def console_logins(who: str) -> str:
    digest = hashlib.sha256(who.encode("utf-8", "surrogateescape")).hexdigest()[:32]
    return f"{NS}:console:logins:{digest}"


def watermark(inbox: str, folder: str, uidvalidity: int) -> str:
    return f"{NS}:watermark:{inbox}:{quote(folder, safe='')}:{uidvalidity}"


def slot(entity: str, fingerprint: str) -> str:
    return f"{NS}:slot:{quote(entity, safe='')}:{fingerprint}"


def unfetchable(inbox: str, uidvalidity: int, uid: int) -> str:
    return f"{NS}:unfetchable:{inbox}:{uidvalidity}:{uid}"


def rate_bucket(name: str) -> str:
    return f"{NS}:ratelimit:{name}"


def rate_pause(name: str) -> str:
    return f"{NS}:ratelimit:{name}:pause"


def rate_stats(name: str) -> str:
    return f"{NS}:ratelimit:{name}:stats"


def poll_lock(inbox: str) -> str:
    return f"{NS}:lock:poll:{inbox}"


def repoll(inbox: str) -> str:
    return f"{NS}:repoll:{inbox}"


def step_lock(name: str) -> str:
    return f"{NS}:lock:step:{name}"


def lease_note(lease_key: str) -> str:
    """The note that a lease was taken and not given back (its holder's token): the
    lease gone while its note stays *lapsed* (the holder died or hung)."""
    return f"{NS}:taken:{lease_key}"


def poll_status(inbox: str) -> str:
    return f"{NS}:poll:{inbox}"


def doubt(entity: str, name: str, extension: str, type_: str) -> str:
    kind = hashlib.sha256(f"{name}\0{extension}\0{type_}".encode("utf-8", "surrogateescape"))
    return f"{NS}:doubt:{quote(entity, safe='')}:{kind.hexdigest()[:24]}"


def token_claim(token: str) -> str:
    return f"{NS}:token:{token}"


def oauth(inbox: str) -> str:
    return f"{NS}:oauth:{inbox}"


def oauth_lock(inbox: str) -> str:
    return f"{NS}:lock:oauth:{inbox}"


def reply(message_key: str, kind: str) -> str:
    """The reply of ``kind`` to every delivery and replay of one mail (its message key)."""
    digest = hashlib.sha256(message_key.encode("utf-8", "surrogateescape")).hexdigest()[:32]
    return f"{NS}:reply:{kind}:{digest}"


def reply_rate(kind: str, address: str) -> str:
    """How many replies of ``kind`` went to ``address`` in the current window."""
    digest = hashlib.sha256(address.lower().encode("utf-8", "surrogateescape")).hexdigest()[:32]
    return f"{NS}:reply-rate:{kind}:{digest}"


REPLIES_DUE = f"{NS}:replies-due"
REPLY_OUTCOMES = f"{NS}:reply-outcomes"


def as_text(value: object) -> str:
    """A Redis reply (bytes, or str with ``decode_responses``) as text."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
