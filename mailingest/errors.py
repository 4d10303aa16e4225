"""Every failure mailingest names, and what an operator needs to act on it.

    MailingestError
    ├── ConfigError              a setting is missing or malformed (stops start-up)
    ├── AlloyError               Alloy answered an error, or could not be reached
    │   ├── AlloyRejected        4xx other than 401/429: final, the mail is quarantined
    │   └── AlloyUnavailable     401, 429, 5xx, timeout, connection error: retried
    ├── ResolverError            a sender directory or CRM hook could not answer (retried)
    ├── MailboxError             the IMAP server refused or dropped us (retried)
    ├── Busy                     another copy of the same document is in flight (retried)
    └── MailError                one mail cannot be handled (quarantined with the reason)

Messages never contain document bytes, mail bodies, passwords or tokens:
they name the mail (ledger key), the document (index and name) and what
Alloy said (status, minor code, message, error token).
"""

from __future__ import annotations


class MailingestError(Exception):
    """Base class of all mailingest errors."""


class ConfigError(MailingestError):
    """A setting is missing or malformed; ``str()`` is the one line to print."""

    def __init__(self, variable: str, problem: str) -> None:
        self.variable = variable
        self.problem = problem
        super().__init__(f"{variable} {problem}")


class AlloyError(MailingestError):
    """Alloy answered with an error body, or the request did not complete."""

    retryable = False

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

    retryable = True


class ResolverError(MailingestError):
    """A sender directory or the CRM hook could not answer; retried."""

    retryable = True


class MailboxError(MailingestError):
    """The IMAP server refused a command or the connection dropped; retried."""

    retryable = True


class Busy(MailingestError):
    """The same document (same mail, same bytes) is being uploaded by another copy of the
    mail; wait for it and adopt its result rather than upload a second one."""

    retryable = True


class MailError(MailingestError):
    """One mail cannot be handled; it goes to quarantine with this reason."""
