"""The usage pages' HTML: Jinja templates shipped in the package (autoescaped), and the
stylesheet they link. No script, no font, no asset from anywhere else."""

from __future__ import annotations

from decimal import Decimal
from importlib.resources import files
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

from metering.portal.charts import exact, readable

_environment = Environment(
    loader=PackageLoader("metering.portal", "templates"),
    autoescape=select_autoescape(["html"]),
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
_environment.filters["readable"] = lambda value: readable(Decimal(value))
_environment.filters["exact"] = lambda value: exact(Decimal(value))


def render(template: str, **context: Any) -> str:
    """The page `template` (a file of metering/portal/templates) with `context`."""
    return _environment.get_template(template).render(**context)


STYLESHEET = (files("metering.portal") / "static" / "pages.css").read_bytes()
FAVICON = (files("metering.portal") / "static" / "favicon.svg").read_bytes()
