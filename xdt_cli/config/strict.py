"""`Strict`, the base of every config section (the schema and the transforms' arguments)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    """Base of every config section: unknown keys are errors.

    Integer fields are strict (YAML already yields ints, so `true` or `"10"` is a mistake);
    float fields stay lax so that `1e-3`, which PyYAML reads as a string, is a float.
    """

    # inf and nan are refused for every float (an infinite lr would only fail in training)
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
