"""Templates of the pages: one Jinja2 environment, its filters, and rendering per locale.

Owns: the environment (autoescape always on: every value from a resource is escaped), the
filters the templates use to show FHIR data (dates, numbers, ages, names, concepts,
references) and the one place Narrative XHTML becomes markup: ``narrative``, sanitised
with nh3 (ammonia) to a short list of text tags, no attributes but a few safe ones, no
scripts, styles, forms, frames or event handlers.
Calls: Jinja2, nh3, ``hub.web.i18n``.  Called by: ``hub.web.context`` (``Page.render``),
``hub.web.app`` (login and error pages).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, date, datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import nh3
from jinja2 import Environment, FileSystemLoader, pass_context, select_autoescape
from jinja2.runtime import Context
from markupsafe import Markup

from hub.web import i18n

TEMPLATE_DIR = Path(__file__).parent / "templates"

# What a narrative may keep: text structure, tables, lists, emphasis, links (rel added).
_NARRATIVE_TAGS = {
    "a", "abbr", "b", "br", "caption", "cite", "code", "dd", "div", "dl", "dt", "em", "h1", "h2", "h3",
    "h4", "h5", "h6", "hr", "i", "li", "ol", "p", "pre", "q", "small", "span", "strong", "sub", "sup",
    "table", "tbody", "td", "tfoot", "th", "thead", "tr", "u", "ul",
}  # fmt: skip
_NARRATIVE_ATTRIBUTES = {"a": {"href", "title"}, "td": {"colspan", "rowspan"}, "th": {"colspan", "rowspan"}}


def parse_fhir_moment(value: object) -> date | datetime | None:
    """A FHIR date or dateTime ("2020", "2020-03", "2020-03-10", "2020-03-10T08:00:00+07:00")."""
    if isinstance(value, datetime | date):
        return value
    if not isinstance(value, str) or not value:
        return None
    text = value.strip()
    try:
        if "T" in text:
            moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
            return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
        if len(text) == 4:
            return date(int(text), 1, 1)
        if len(text) == 7:
            return date(int(text[:4]), int(text[5:7]), 1)
        return date.fromisoformat(text[:10])
    except ValueError:
        return None


def _locale(context: Context) -> str:
    return str(context.get("locale") or i18n.DEFAULT_LOCALE)


@pass_context
def date_filter(context: Context, value: object) -> str:
    """A FHIR date/dateTime as the locale's date; a partial date keeps its precision."""
    if isinstance(value, str) and len(value.strip()) == 4 and value.strip().isdigit():
        return value.strip()  # a year alone
    moment = parse_fhir_moment(value)
    if moment is None:
        return "" if value is None else str(value)
    if isinstance(moment, datetime):
        moment = moment.astimezone(i18n.DISPLAY_ZONE).date()
    if isinstance(value, str) and len(value.strip()) == 7:
        return f"{moment.month:02d}/{moment.year}"
    return i18n.display_date(moment, _locale(context))


@pass_context
def datetime_filter(context: Context, value: object) -> str:
    moment = parse_fhir_moment(value)
    if moment is None:
        return "" if value is None else str(value)
    if not isinstance(moment, datetime):
        return date_filter(context, value)
    return i18n.display_datetime(moment, _locale(context))


@pass_context
def number_filter(context: Context, value: object, digits: int | None = None) -> str:
    if value is None or isinstance(value, bool):
        return ""
    try:
        number = value if isinstance(value, int | float | Decimal) else Decimal(str(value))
    except InvalidOperation:
        return str(value)
    return i18n.display_number(number, _locale(context), digits)


def age_years(birth_date: object, today: date | None = None) -> int | None:
    born = parse_fhir_moment(birth_date)
    if born is None:
        return None
    if isinstance(born, datetime):
        born = born.date()
    today = today or date.today()
    return today.year - born.year - ((today.month, today.day) < (born.month, born.day))


def age_filter(birth_date: object) -> str:
    years = age_years(birth_date)
    return "" if years is None else str(years)


def human_name(names: object) -> str:
    """A Patient's/Practitioner's name list as one text: the official (or first) name."""
    if not isinstance(names, list) or not names:
        return ""
    chosen = next((n for n in names if isinstance(n, dict) and n.get("use") == "official"), names[0])
    if not isinstance(chosen, dict):
        return ""
    if isinstance(chosen.get("text"), str) and chosen["text"].strip():
        return str(chosen["text"]).strip()
    given = [g for g in chosen.get("given") or [] if isinstance(g, str)]
    family = chosen.get("family") if isinstance(chosen.get("family"), str) else ""
    # Vietnamese order: family name first ("Nguyễn Thị Hoa").
    return " ".join(part for part in [family, *given] if part).strip()


def concept(value: object) -> str:
    """A CodeableConcept (or Coding, or list of them) as the words a person reads."""
    if isinstance(value, list):
        return ", ".join(text for text in (concept(v) for v in value) if text)
    if not isinstance(value, Mapping):
        return "" if value is None else str(value)
    if isinstance(value.get("text"), str) and value["text"].strip():
        return str(value["text"]).strip()
    if "coding" in value:
        for coding in value.get("coding") or []:
            if isinstance(coding, Mapping):
                shown = coding.get("display") or coding.get("code")
                if shown:
                    return str(shown)
        return ""
    shown = value.get("display") or value.get("code")
    return str(shown) if shown else ""


def ref_id(reference: object) -> str:
    """``Patient/abc`` (or a Reference, or an absolute URL) → ``abc``."""
    if isinstance(reference, Mapping):
        reference = reference.get("reference")
    if not isinstance(reference, str):
        return ""
    return reference.rstrip("/").split("/_history/")[0].rsplit("/", 1)[-1]


def sanitise_narrative(xhtml: str) -> str:
    return nh3.clean(
        xhtml,
        tags=_NARRATIVE_TAGS,
        attributes=_NARRATIVE_ATTRIBUTES,
        url_schemes={"http", "https"},
        link_rel="noopener noreferrer nofollow",
        strip_comments=True,
    )


def narrative(value: object) -> Markup:
    """A resource's ``text`` (Narrative) or its ``div`` as sanitised markup; nothing else is
    ever shown unescaped."""
    div = value.get("div") if isinstance(value, Mapping) else value
    if not isinstance(div, str) or not div.strip():
        return Markup("")
    return Markup(sanitise_narrative(div))  # noqa: S704  (sanitised just above)


def build_environment() -> Environment:
    env = Environment(
        loader=FileSystemLoader(TEMPLATE_DIR),
        autoescape=select_autoescape(default=True, default_for_string=True),
        extensions=["jinja2.ext.i18n"],
        trim_blocks=True,
        lstrip_blocks=True,
        auto_reload=False,
    )
    env.filters.update(
        date=date_filter,
        datetime=datetime_filter,
        number=number_filter,
        age=age_filter,
        human_name=human_name,
        concept=concept,
        narrative=narrative,
        ref_id=ref_id,
    )
    return env


ENVIRONMENT = build_environment()


def render(template: str, locale: str, context: Mapping[str, Any]) -> str:
    """Render with the locale's translations (``_``, ``gettext``, ``ngettext`` in the context)."""
    translations = i18n.translations(locale)
    values: dict[str, Any] = {
        "locale": locale,
        "_": translations.gettext,
        "gettext": translations.gettext,
        "ngettext": translations.ngettext,
        **context,
    }
    return ENVIRONMENT.get_template(template).render(values)
