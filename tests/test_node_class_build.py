"""Node classes build no pydantic validator when defined (process start-up): the engine constructs nodes without
validation; a validated construction still validates, building the validator on first use."""

from __future__ import annotations

from typing import Annotated

import pydantic
import pytest
from engine_helpers import add, collect, const, make_engine

from latentloom.engine.node import Node
from latentloom.engine.types import FLOAT, Float, Output


class Scale(Node):
    outputs = (Output(FLOAT),)
    value: Annotated[float, Float()] = 1.0
    factor: Annotated[float, Float()] = 2.0

    def run(self, ctx):
        return (self.value * self.factor,)


def test_defining_a_node_builds_no_validator_and_construct_needs_none():
    assert not Scale.__pydantic_complete__
    assert set(Scale.input_specs()) == {"value", "factor"}
    assert Scale.model_construct(value=3.0).run(None) == (6.0,)
    assert not Scale.__pydantic_complete__


def test_validated_construction_still_validates():
    class Strict(Node):
        outputs = (Output(FLOAT),)
        value: Annotated[float, Float()] = 1.0

    assert not Strict.__pydantic_complete__
    with pytest.raises(pydantic.ValidationError, match="value"):
        Strict(value="not a number")
    assert Strict(value="2.5").value == 2.5
    assert Strict.__pydantic_complete__


def test_engine_runs_nodes_whose_validators_were_never_built(tmp_path):
    engine, calls = make_engine(tmp_path)
    classes = [engine.registry.get(name) for name in ("Const", "Add", "Collect")]
    result = engine.run({"1": const(2.0), "2": add("1", 0.5), "3": collect("2")})
    assert result.status == "success", result.error
    assert result.outputs["3"] == {"values": [2.5]}
    assert not any(cls.__pydantic_complete__ for cls in classes)
