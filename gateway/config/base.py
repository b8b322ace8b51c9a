"""What every settings section shares: unknown keys refused, values frozen, units in
the type (a port, a positive number), and ordered pairs checked with both keys named."""

from __future__ import annotations

from typing import Annotated

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
)

Port = Annotated[int, Field(ge=1, le=65535)]
PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]


def require_order(section: BaseModel, low: str, high: str) -> None:
    """A (min, max) pair of settings must not be inverted; the message names both keys."""
    low_value, high_value = getattr(section, low), getattr(section, high)
    if high_value < low_value:
        raise ValueError(f"{high} ({high_value}) must be >= {low} ({low_value})")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
