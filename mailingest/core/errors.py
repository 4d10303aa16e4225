"""Every failure mailingest names, and what an operator needs to act on it.

    MailingestError
    ├── ConfigError              settings are missing or malformed, all listed (stops start-up)
    ├── AlloyError               Alloy answered an error, or could not be reached
    │   ├── AlloyRejected        4xx other than 401/429: final, the mail is quarantined
    │   └── AlloyUnavailable     401, 429, 5xx, timeout, connection error: retried
    ├── ResolverError            a sender directory or CRM hook could not answer (retried)
    ├── MailboxError             the IMAP server refused or dropped us (retried)
    │   └── OAuthError           the OAuth2 token endpoint refused or failed (retried;
    │                            ``needs_operator``: re-consent or fix the client)
    ├── Busy                     another run moved the document on meanwhile (retried)
    │   └── InDoubt              a describe whose answer was lost may still become an
    │                            Alloy document: look again after ``retry_after`` s
    └── MailError                one mail cannot be handled (quarantined with the reason)

Messages never contain document bytes, mail bodies, passwords or tokens:
they name the mail (ledger key), the document (index and name) and what
Alloy said (status, minor code, message, error token). Which errors are worth
another try is decided in one place, by the pipeline, not by attributes here.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial


class MailingestError(Exception):
    """Base class of all mailingest errors."""


class ConfigError(MailingestError):
    """Settings are missing or malformed: ``problems`` holds each as (setting, what is
    wrong), all found at once so that one run shows everything to fix. ``str()`` is one
    line per problem, each naming its setting (``variable``/``problem``: the first)."""

    def __init__(self, variable: str, problem: str, *more: tuple[str, str]) -> None:
        self.problems: tuple[tuple[str, str], ...] = ((variable, problem), *more)
        self.variable = variable
        self.problem = problem
        super().__init__("\n".join(self.lines()))

    @classmethod
    def of(cls, problems: Sequence[tuple[str, str]]) -> ConfigError:
        (variable, problem), *more = problems
        return cls(variable, problem, *more)

    def lines(self) -> list[str]:
        return [f"{variable} {problem}" for variable, problem in self.problems]


class AlloyError(MailingestError):
    """Alloy answered with an error body, or the request did not complete."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        minor_code: int | None = None,
        error_type: str | None = None,
        error_token: str | None = None,
        details: object = None,
        retry_after: float | None = None,
        operation: str = "",
    ) -> None:
        self.message = message
        self.status = status
        self.minor_code = minor_code
        self.error_type = error_type
        self.error_token = error_token
        self.details = details
        self.retry_after = retry_after
        self.operation = operation
        # False when Alloy certainly did not carry the request out (never sent, refused,
        # rate limited, offline); True when it may have (a timeout, a lost answer, a 500)
        self.applied = True
        super().__init__(self.describe())

    def describe(self) -> str:
        """One line fit for the ledger and the logs."""
        head = f"Alloy {self.operation} " if self.operation else "Alloy "
        if self.status is None:
            return f"{head}failed: {self.message}"
        code = f"{self.status}/{self.minor_code}" if self.minor_code else f"{self.status}"
        text = f"{head}answered {code}: {self.message}"
        if isinstance(self.details, dict) and self.details.get("message"):
            text += f" ({self.details['message']})"
        if self.error_token:
            text += f" [error_token {self.error_token}]"
        return text


class AlloyRejected(AlloyError):
    """A 4xx answer other than 401/429: sending the same request again cannot help."""


class AlloyUnavailable(AlloyError):
    """401 (our credentials), 429, 5xx, a timeout or a dropped connection: retry later."""


class ResolverError(MailingestError):
    """A sender directory or the CRM hook could not answer; retried."""


class MailboxError(MailingestError):
    """The IMAP server refused a command or the connection dropped; retried."""


class OAuthError(MailboxError):
    """The token endpoint refused the refresh grant, or could not be reached.

    Carries what an operator acts on (the inbox, the endpoint without its query,
    the HTTP status, the OAuth ``error`` code and a bounded description), never a
    token or the client secret. ``needs_operator`` is set when retrying cannot help
    (``invalid_grant``: consent again; ``invalid_client``: fix the client); polls
    are retried either way, so the inbox recovers once the setting is fixed.
    """

    def __init__(
        self,
        inbox: str,
        token_url: str,
        problem: str,
        *,
        status: int | None = None,
        error: str | None = None,
        description: str | None = None,
        needs_operator: bool = False,
        hint: str | None = None,
    ) -> None:
        self.inbox = inbox
        self.token_url = token_url
        self.problem = problem
        self.status = status
        self.error = error
        self.description = description
        self.needs_operator = needs_operator
        self.hint = hint
        super().__init__(self.describe())

    def __reduce__(self) -> tuple[object, ...]:  # pickles (Celery results) keep every field
        rebuild = partial(
            type(self),
            status=self.status,
            error=self.error,
            description=self.description,
            needs_operator=self.needs_operator,
            hint=self.hint,
        )
        return (rebuild, (self.inbox, self.token_url, self.problem))

    def describe(self) -> str:
        """One line fit for the poll status and the logs."""
        text = f"inbox {self.inbox}: OAuth token refresh at {self.token_url} {self.problem}"
        if self.status is not None:
            text += f" (HTTP {self.status}"
            text += f", {self.error})" if self.error else ")"
        elif self.error:
            text += f" ({self.error})"
        if self.description:
            text += f": {self.description}"
        if self.hint:
            text += f"; {self.hint}"
        return text


class Busy(MailingestError):
    """Another run (of this mail, or of another copy of it) moved the document on while
    this one looked: look again rather than act on what it saw."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        self.retry_after = retry_after
        super().__init__(message)


class InDoubt(Busy):
    """A describe of this document was sent and its answer never came: Alloy may still
    commit it (connect + read timeout + ``ALLOY_COMMIT_HORIZON`` + 5 s). Until then the
    document is not described again; it is looked for at Alloy after ``retry_after`` s."""


class MailError(MailingestError):
    """One mail cannot be handled; it goes to quarantine with this reason."""


class ReplyError(MailingestError):
    """A reply to a customer was not sent, or may have been (``in_doubt``: the connection
    failed while the message itself was on its way). ``retryable``: the server said 4xx
    or could not be reached, so a later try may go; else it will not (a 5xx, a setting).
    Never about the mail itself: its filing does not wait for its reply."""

    def __init__(self, message: str, *, retryable: bool = False, in_doubt: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable and not in_doubt
        self.in_doubt = in_doubt


class MailFailed(MailingestError):
    """A step ran out of tries; its mail (or its reply) is recorded failed with this
    reason. The task raises it last, so that Celery, and Flower, show it failed."""
