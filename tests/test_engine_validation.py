"""Validation: ComfyUI's error types and shapes, plus what ComfyUI gets wrong (cycles, coercion, deep chains)."""

import copy
import json

import pytest
from engine_helpers import add, collect, const, make_engine

from latentloom.engine.validation import CoercionError, coerce_value


@pytest.fixture
def engine(tmp_path):
    return make_engine(tmp_path)[0]


def errors_of(result, node_id):
    return [e["type"] for e in result.node_errors[node_id]["errors"]]


def test_valid_graph_and_input_is_not_mutated(engine):
    prompt = {"1": const("2.5"), "2": add("1", 1), "3": collect("2")}
    before = copy.deepcopy(prompt)
    result = engine.validate(prompt)
    assert result.ok and result.graph.outputs == ["3"]
    assert result.graph.nodes["1"].constants["value"] == 2.5  # coerced into the typed graph
    assert prompt == before  # ...not into the submitted prompt


def test_unknown_node_type_is_missing_node_type(engine):
    result = engine.validate({"1": {"class_type": "Nope", "inputs": {}, "_meta": {"title": "Mine"}}})
    assert not result.ok
    assert result.error["type"] == "missing_node_type"
    assert result.error["extra_info"] == {"node_id": "1", "class_type": "Nope", "node_title": "Mine"}
    assert "Mine" in result.error["message"]


def test_missing_class_type(engine):
    result = engine.validate({"1": {"inputs": {}}})
    assert result.error["type"] == "missing_node_type" and result.error["extra_info"]["class_type"] is None


def test_no_outputs(engine):
    assert engine.validate({"1": const(1)}).error["type"] == "prompt_no_outputs"
    prompt = {"1": const(1), "2": collect("1")}
    assert engine.validate(prompt, targets=[]).error["type"] == "prompt_no_outputs"


def test_required_input_missing(engine):
    result = engine.validate({"1": {"class_type": "Add", "inputs": {"b": 1}}, "2": collect("1")})
    assert result.error["type"] == "prompt_outputs_failed_validation"
    assert errors_of(result, "1") == ["required_input_missing"]
    entry = result.node_errors["1"]
    assert entry["class_type"] == "Add" and entry["dependent_outputs"] == ["2"]
    assert entry["errors"][0]["details"] == "a"


def test_bad_link_shapes(engine):
    prompt = {"1": const(1), "2": {"class_type": "Add", "inputs": {"a": ["1", 0, 5], "b": 0}}, "3": collect("2")}
    assert errors_of(engine.validate(prompt), "2") == ["bad_linked_input"]
    prompt["2"]["inputs"]["a"] = ["99", 0]  # a deleted node
    assert errors_of(engine.validate(prompt), "2") == ["bad_linked_input"]
    prompt["2"]["inputs"]["a"] = ["1", 3]  # a slot the source does not have
    assert errors_of(engine.validate(prompt), "2") == ["bad_linked_input"]


def test_type_mismatch(engine):
    prompt = {"1": {"class_type": "Pick", "inputs": {"choice": "red", "flag": False}}, "2": add("1"),
              "3": collect("2")}
    result = engine.validate(prompt)
    (error,) = result.node_errors["2"]["errors"]
    assert error["type"] == "return_type_mismatch"
    assert error["details"] == "a, received_type(STRING) mismatch input_type(FLOAT)"


def test_wildcard_and_union_types(engine):
    # Collect takes "*"; FloatOnly takes "IMAGE,FLOAT" and checks linked types itself.
    prompt = {"1": {"class_type": "Pick", "inputs": {"choice": "red", "flag": True}}, "2": collect("1")}
    assert engine.validate(prompt).ok
    prompt = {"1": const(1), "2": {"class_type": "FloatOnly", "inputs": {"value": ["1", 0]}}, "3": collect("2")}
    assert engine.validate(prompt).ok
    prompt["1"] = {"class_type": "IntConst", "inputs": {"value": 3}}
    assert errors_of(engine.validate(prompt), "2") == ["custom_validation_failed"]


@pytest.mark.parametrize("raw,expected", [
    ("false", False), ("False", False), ("0", False), (0, False), ("true", True), (1, True), (True, True)])
def test_boolean_coercion_is_honest(raw, expected):
    assert coerce_value("BOOLEAN", raw) is expected


@pytest.mark.parametrize("spec,raw", [("BOOLEAN", "maybe"), ("BOOLEAN", 2), ("INT", 5.7), ("INT", "x"),
                                      ("INT", True), ("FLOAT", "abc"), ("FLOAT", float("nan")), ("STRING", [1])])
def test_bad_literals_are_refused(spec, raw):
    with pytest.raises((CoercionError, ValueError)):
        coerce_value(spec, raw)


def test_invalid_input_type_error(engine):
    prompt = {"1": {"class_type": "Pick", "inputs": {"choice": "red", "flag": "maybe"}}, "2": collect("1")}
    (error,) = engine.validate(prompt).node_errors["1"]["errors"]
    assert error["type"] == "invalid_input_type" and error["extra_info"]["received_value"] == "maybe"


def test_range_and_combo_errors(engine):
    prompt = {"1": const(5000), "2": collect("1")}
    assert errors_of(engine.validate(prompt), "1") == ["value_bigger_than_max"]
    prompt = {"1": const(-5000), "2": collect("1")}
    assert errors_of(engine.validate(prompt), "1") == ["value_smaller_than_min"]
    prompt = {"1": {"class_type": "Pick", "inputs": {"choice": "purple", "flag": False}}, "2": collect("1")}
    (error,) = engine.validate(prompt).node_errors["1"]["errors"]
    assert error["type"] == "value_not_in_list"
    assert error["details"] == "choice: 'purple' not in ['red', 'green', 'blue']"


def test_custom_validator(engine):
    prompt = {"1": {"class_type": "EvenOnly", "inputs": {"value": 3}}, "2": collect("1")}
    (error,) = engine.validate(prompt).node_errors["1"]["errors"]
    assert error["type"] == "custom_validation_failed" and error["details"] == "value - 3 is odd"
    assert error["extra_info"]["input_name"] == "value"
    prompt["1"]["inputs"]["value"] = 4
    assert engine.validate(prompt).ok


def test_literal_list_wrapping(engine):
    prompt = {"1": {"class_type": "Pick", "inputs": {"choice": {"__value__": ["red"]}, "flag": False}},
              "2": collect("1")}
    # a literal list is unwrapped, and a list is not a valid choice
    assert errors_of(engine.validate(prompt), "1") == ["invalid_input_type"]


def test_cycle_is_reported_with_its_nodes(engine):
    prompt = {"1": add("3"), "2": add("1"), "3": add("2"), "4": collect("3")}
    result = engine.validate(prompt)
    assert not result.ok
    cycle_errors = {node_id: entry["errors"][0] for node_id, entry in result.node_errors.items()}
    assert set(cycle_errors) == {"1", "2", "3"}
    for error in cycle_errors.values():
        assert error["type"] == "dependency_cycle"
        assert sorted(error["extra_info"]["cycle"]) == ["1", "2", "3"]
        assert "#1 Add" in error["details"] and "#3 Add" in error["details"]


def test_self_loop_is_a_cycle(engine):
    result = engine.validate({"1": add("1"), "2": collect("1")})
    assert errors_of(result, "1") == ["dependency_cycle"]


def test_invalid_output_dropped_valid_one_runs(engine):
    prompt = {"1": const(1), "2": collect("1"), "3": add("99"), "4": collect("3")}
    result = engine.validate(prompt)
    assert result.ok and result.graph.outputs == ["2"]
    assert result.node_errors["3"]["dependent_outputs"] == ["4"]
    run = engine.run(prompt)
    assert run.ok and run.outputs == {"2": {"values": [1.0]}}


def test_partial_targets_ignore_broken_branches(engine):
    prompt = {"1": const(1), "2": collect("1"), "3": add("99"), "4": collect("3")}
    result = engine.validate(prompt, targets=["2"])
    assert result.ok and result.node_errors == {}


def test_deep_chain_validates_without_recursion(engine):
    n = 5000
    prompt = {"0": const(0)}
    for i in range(1, n):
        prompt[str(i)] = add(str(i - 1), 1)
    prompt["out"] = collect(str(n - 1))
    assert engine.validate(prompt).ok


def test_error_body_is_json_serialisable(engine):
    prompt = {"1": add("3"), "2": add("1"), "3": add("2"), "4": collect("3")}
    json.dumps(engine.validate(prompt).as_response())
