"""The replies' words: templates in files, per language, rendered with Jinja2's sandbox.

A language is a folder: ``<kind>.txt`` for each reply kind (``received``, ``refused``,
``unknown``), an optional ``<kind>.html`` (sent as the HTML alternative), and
``texts.toml`` (what each document type and each refusal code is called). The shipped
folders (``mailingest/adapters/reply_texts``: ``en``, ``de``) are the defaults; an
inbox's ``REPLY_TEMPLATES`` folder is looked in first, file by file. Templates are
rendered in Jinja2's sandbox with undefined names an error, and every template an
inbox uses is rendered once with sample values when the settings are read: a template
that cannot render stops start-up (and ``check-config``), never a reply.
"""

from __future__ import annotations

import functools
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2
from jinja2.sandbox import SandboxedEnvironment

from mailingest.core.documents import DOCUMENT_TYPES
from mailingest.core.replies import PART_CODES, RefusedPart

if TYPE_CHECKING:
    from mailingest.config.settings import ReplySettings

SHIPPED = Path(__file__).resolve().parent / "reply_texts"


class TemplateError(ValueError):
    """A template or texts file cannot be read or rendered; says which and why."""


@dataclass(frozen=True)
class Rendered:
    text: str
    html: str | None


@dataclass(frozen=True)
class FiledDocument:
    name: str  # as filed: "passport.pdf"
    type: str  # Alloy's type


class Templates:
    """The templates of one language, the operator's over the shipped ones."""

    def __init__(self, language: str, own: Path | None = None) -> None:
        if not language or "/" in language or language.startswith("."):
            raise TemplateError(f"{language!r} is not a language folder name")
        self.language = language
        folders = [own / language] if own is not None else []
        folders.append(SHIPPED / language)
        self.folders = [f for f in folders if f.is_dir()]
        if not self.folders:
            raise TemplateError(
                f"no templates for language {language!r} (shipped: "
                f"{', '.join(sorted(p.name for p in SHIPPED.iterdir() if p.is_dir()))})"
            )
        self.env = SandboxedEnvironment(
            loader=jinja2.FileSystemLoader([str(f) for f in self.folders]),
            undefined=jinja2.StrictUndefined,
            autoescape=jinja2.select_autoescape(enabled_extensions=("html",)),
            keep_trailing_newline=True,
        )
        self.texts = self._texts()

    def _texts(self) -> dict[str, dict[str, str]]:
        for folder in self.folders:
            path = folder / "texts.toml"
            if path.is_file():
                try:
                    data = tomllib.loads(path.read_text(encoding="utf-8"))
                except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
                    raise TemplateError(f"{path}: {exc}") from None
                types, reasons = data.get("types", {}), data.get("reasons", {})
                missing = [t for t in DOCUMENT_TYPES if t not in types]
                missing += [c for c in PART_CODES if c not in reasons]
                if missing:
                    raise TemplateError(f"{path}: no text for {', '.join(missing)}")
                return {"types": dict(types), "reasons": dict(reasons)}
        raise TemplateError(f"no texts.toml for language {self.language!r}")

    def render(
        self,
        kind: str,
        *,
        subject: str,
        sender: str,
        team: str,
        documents: list[FiledDocument],
        refused: list[RefusedPart],
    ) -> Rendered:
        values: dict[str, Any] = {
            "subject": subject,
            "sender": sender,
            "team": team,
            "documents": [
                {"name": d.name, "type": d.type, "type_text": self.texts["types"][d.type]}
                for d in documents
            ],
            "refused": [
                {"name": p.name, "code": p.code, "reason_text": self.texts["reasons"][p.code]}
                for p in refused
            ],
        }
        text = self._render(f"{kind}.txt", values)
        if text is None:
            raise TemplateError(f"no template {kind}.txt for language {self.language!r}")
        return Rendered(text, self._render(f"{kind}.html", values))

    def _render(self, name: str, values: dict[str, Any]) -> str | None:
        try:
            template = self.env.get_template(name)
        except jinja2.TemplateNotFound:
            return None
        except jinja2.TemplateSyntaxError as exc:
            raise TemplateError(f"{exc.filename}:{exc.lineno}: {exc.message}") from None
        try:
            return template.render(values)
        except jinja2.TemplateError as exc:  # an undefined name, a sandbox refusal
            raise TemplateError(f"{template.filename}: {exc}") from None


@functools.lru_cache(maxsize=16)
def templates(language: str, own: Path | None = None) -> Templates:
    """The templates of a language, read and compiled once per process: replies render
    them from memory (the files were checked at start-up; an edit takes a restart)."""
    return Templates(language, own)


SAMPLE_DOCUMENTS = [FiledDocument("passport.pdf", "passport")]
SAMPLE_REFUSED = [RefusedPart("archive.zip", "archive"), RefusedPart("", "none")]


def check_templates(replies: ReplySettings) -> None:
    """Render every template the inbox will send, with sample values; TemplateError
    names the first file that cannot be read or rendered."""
    found = templates(replies.language, replies.templates)
    for kind in sorted(replies.kinds):
        found.render(
            kind,
            subject="My documents",
            sender="customer@example.com",
            team=replies.from_name,
            documents=SAMPLE_DOCUMENTS,
            refused=SAMPLE_REFUSED,
        )
