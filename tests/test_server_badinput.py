"""A catalogue of bad /prompt bodies: each gets a 4xx with a precise error (and node_errors naming the node and
input where one is at fault), none a 500; then hypothesis fuzzing of /prompt bodies."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from tests.server_support import const_graph, make_app


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    root = tmp_path_factory.mktemp("badinput")
    # No worker: nothing is run, so the valid prompts of the fuzzing only accumulate in the queue.
    with TestClient(make_app(root, start_worker=False)) as test_client:
        yield test_client


def graph_with(node_id: str, class_type: str, **inputs) -> dict:
    graph = const_graph()
    graph[node_id] = {"class_type": class_type, "inputs": inputs}
    return graph


def collect(source: list) -> dict:
    return {"class_type": "Collect", "inputs": {"value": source}}


# (name, body, expected error type, node id at fault or None, input name or None)
NODE_CASES = [
    ("string for float", graph_with("1", "Const", value="abc"), "invalid_input_type", "1", "value"),
    ("bool for float", graph_with("1", "Const", value=True), "invalid_input_type", "1", "value"),
    ("dict for float", graph_with("1", "Const", value={"a": 1}), "invalid_input_type", "1", "value"),
    ("null for float", graph_with("1", "Const", value=None), "invalid_input_type", "1", "value"),
    ("nan string", graph_with("1", "Const", value="nan"), "invalid_input_type", "1", "value"),
    ("float above max", graph_with("1", "Const", value=1e6), "value_bigger_than_max", "1", "value"),
    ("float below min", graph_with("1", "Const", value=-1e6), "value_smaller_than_min", "1", "value"),
    ("int above max", {**const_graph(), "1": {"class_type": "IntConst", "inputs": {"value": 101}},
                       "2": {"class_type": "Collect", "inputs": {"value": ["1", 0]}}},
     "value_bigger_than_max", "1", "value"),
    ("int below min", {"1": {"class_type": "IntConst", "inputs": {"value": -1}}, "2": collect(["1", 0])},
     "value_smaller_than_min", "1", "value"),
    ("fractional int", {"1": {"class_type": "IntConst", "inputs": {"value": 5.5}}, "2": collect(["1", 0])},
     "invalid_input_type", "1", "value"),
    ("string int", {"1": {"class_type": "IntConst", "inputs": {"value": "five"}}, "2": collect(["1", 0])},
     "invalid_input_type", "1", "value"),
    ("huge int", {"1": {"class_type": "IntConst", "inputs": {"value": 10**30}}, "2": collect(["1", 0])},
     "value_bigger_than_max", "1", "value"),
    ("combo not in list", {"1": {"class_type": "Pick", "inputs": {"choice": "purple"}}, "2": collect(["1", 0])},
     "value_not_in_list", "1", "choice"),
    ("combo wrong type", {"1": {"class_type": "Pick", "inputs": {"choice": ["x"]}}, "2": collect(["1", 0])},
     "bad_linked_input", "1", "choice"),
    ("boolean garbage", {"1": {"class_type": "Pick", "inputs": {"flag": "maybe"}}, "2": collect(["1", 0])},
     "invalid_input_type", "1", "flag"),
    ("required link missing", {"1": {"class_type": "Add", "inputs": {"b": 1.0}}, "2": collect(["1", 0])},
     "required_input_missing", "1", "a"),
    ("output input missing", {"1": {"class_type": "Collect", "inputs": {}}},
     "required_input_missing", "1", "value"),
    ("link to missing node", {"1": collect(["99", 0])}, "bad_linked_input", "1", "value"),
    ("link slot out of range", {"1": {"class_type": "Const", "inputs": {"value": 1.0}}, "2": collect(["1", 5])},
     "bad_linked_input", "2", "value"),
    ("negative slot", {"1": {"class_type": "Const", "inputs": {"value": 1.0}}, "2": collect(["1", -1])},
     "bad_linked_input", "2", "value"),
    ("three element link", {"1": {"class_type": "Const", "inputs": {"value": 1.0}},
                            "2": {"class_type": "Add", "inputs": {"a": ["1", 0, 1]}}, "3": collect(["2", 0])},
     "bad_linked_input", "2", "a"),
    ("type mismatch", {"1": {"class_type": "Pick", "inputs": {}},
                       "2": {"class_type": "Add", "inputs": {"a": ["1", 0]}}, "3": collect(["2", 0])},
     "return_type_mismatch", "2", "a"),
    ("literal for socket", {"1": {"class_type": "Add", "inputs": {"a": "text"}}, "2": collect(["1", 0])},
     None, "1", "a"),
    ("custom validation", {"1": {"class_type": "EvenOnly", "inputs": {"value": 3}}, "2": collect(["1", 0])},
     "custom_validation_failed", "1", None),
    ("cycle", {"1": {"class_type": "Add", "inputs": {"a": ["2", 0]}},
               "2": {"class_type": "Add", "inputs": {"a": ["1", 0]}}, "3": collect(["2", 0])},
     "dependency_cycle", "1", None),
    ("self loop", {"1": {"class_type": "Add", "inputs": {"a": ["1", 0]}}, "2": collect(["1", 0])},
     "dependency_cycle", "1", None),
    ("inputs not an object", {"1": {"class_type": "Const", "inputs": [1, 2]}, "2": collect(["1", 0])},
     "invalid_prompt", "1", None),
    ("upstream error only", {"1": {"class_type": "Const", "inputs": {"value": "x"}},
                             "2": {"class_type": "Add", "inputs": {"a": ["1", 0]}}, "3": collect(["2", 0])},
     "invalid_input_type", "1", "value"),
]

PROMPT_CASES = [
    ("no prompt key", {"client_id": "x"}, "no_prompt"),
    ("prompt is a list", {"prompt": [1, 2]}, "invalid_prompt"),
    ("prompt is a string", {"prompt": "graph"}, "invalid_prompt"),
    ("prompt is null", {"prompt": None}, "invalid_prompt"),
    ("prompt is a number", {"prompt": 3}, "invalid_prompt"),
    ("empty prompt", {"prompt": {}}, "prompt_no_outputs"),
    ("no output nodes", {"prompt": {"1": {"class_type": "Const", "inputs": {"value": 1.0}}}}, "prompt_no_outputs"),
    ("missing class_type", {"prompt": {"1": {"inputs": {}}}}, "missing_node_type"),
    ("unknown class_type", {"prompt": {"1": {"class_type": "NoSuchNode", "inputs": {}}}}, "missing_node_type"),
    ("class_type not a string", {"prompt": {"1": {"class_type": 5, "inputs": {}}}}, "missing_node_type"),
    ("node body is a list", {"prompt": {"1": [1]}}, "missing_node_type"),
    ("node body is null", {"prompt": {"1": None}}, "missing_node_type"),
    ("empty partial targets", {"prompt": const_graph(), "partial_execution_targets": []}, "prompt_no_outputs"),
    ("unknown partial target", {"prompt": const_graph(), "partial_execution_targets": ["42"]}, "prompt_no_outputs"),
    ("partial targets not a list", {"prompt": const_graph(), "partial_execution_targets": "3"}, "invalid_prompt"),
    ("partial targets of objects", {"prompt": const_graph(), "partial_execution_targets": [{}]}, "invalid_prompt"),
    ("extra_data not an object", {"prompt": const_graph(), "extra_data": [1]}, "invalid_prompt"),
    ("client_id an object", {"prompt": const_graph(), "client_id": {"a": 1}}, "invalid_prompt"),
    ("number not a number", {"prompt": const_graph(), "number": "first"}, "invalid_prompt"),
    ("number infinite", {"prompt": const_graph(), "number": "inf"}, "invalid_prompt"),
    ("prompt_id empty", {"prompt": const_graph(), "prompt_id": ""}, "invalid_prompt"),
    ("prompt_id a list", {"prompt": const_graph(), "prompt_id": [1]}, "invalid_prompt"),
    ("prompt_id too long", {"prompt": const_graph(), "prompt_id": "x" * 500}, "invalid_prompt"),
    ("body is a list", [const_graph()], "invalid_prompt"),
    ("body is a string", "prompt", "invalid_prompt"),
]


def test_catalogue_is_big_enough():
    assert len(NODE_CASES) + len(PROMPT_CASES) >= 40


@pytest.mark.parametrize("name,graph,error_type,node_id,input_name", NODE_CASES, ids=[c[0] for c in NODE_CASES])
def test_node_errors_are_precise(client, name, graph, error_type, node_id, input_name):
    response = client.post("/prompt", json={"prompt": graph})
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["error"]["type"] == "prompt_outputs_failed_validation"
    assert node_id in body["node_errors"], body
    entry = body["node_errors"][node_id]
    assert entry["class_type"] == graph[node_id]["class_type"] and entry["dependent_outputs"]
    errors = entry["errors"]
    if error_type is not None:
        assert error_type in [e["type"] for e in errors], errors
    if input_name is not None:
        assert any(e["extra_info"].get("input_name") == input_name or input_name in e["details"] for e in errors)
    for error in errors:
        assert set(error) == {"type", "message", "details", "extra_info"} and error["message"]


@pytest.mark.parametrize("name,body,error_type", PROMPT_CASES, ids=[c[0] for c in PROMPT_CASES])
def test_prompt_errors(client, name, body, error_type):
    response = client.post("/prompt", content=json.dumps(body))
    assert response.status_code == 400, response.text
    data = response.json()
    assert data["error"]["type"] == error_type
    assert set(data["error"]) == {"type", "message", "details", "extra_info"}
    assert isinstance(data["node_errors"], dict)


def test_missing_node_names_the_node(client):
    body = client.post("/prompt", json={"prompt": {"7": {"class_type": "Gone", "inputs": {},
                                                         "_meta": {"title": "My Gone"}}}}).json()
    assert body["error"]["extra_info"] == {"node_id": "7", "class_type": "Gone", "node_title": "My Gone"}


def test_not_json_at_all(client):
    for raw in (b"", b"\xff\xfe", b"{", b"nul", b"[1,"):
        response = client.post("/prompt", content=raw)
        assert response.status_code == 400, raw


# Fuzzing ------------------------------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=12)
class_types = st.sampled_from(["Const", "Add", "Collect", "Pick", "IntConst", "EvenOnly", "Mix", "Nope"])
node_ids = st.sampled_from(["1", "2", "3", "4"])
links = st.tuples(node_ids, st.integers(-1, 3)).map(list)
input_values = json_values | links
nodes = st.fixed_dictionaries({"class_type": class_types,
                               "inputs": st.dictionaries(st.sampled_from(["value", "a", "b", "choice", "flag",
                                                                         "first", "mask"]), input_values,
                                                         max_size=4)})
prompts = st.dictionaries(node_ids, nodes | json_values, max_size=4)
bodies = st.fixed_dictionaries({"prompt": prompts | json_values},
                               optional={"client_id": json_values, "number": json_values, "front": json_values,
                                         "extra_data": json_values, "prompt_id": json_values,
                                         "partial_execution_targets": json_values})


@pytest.mark.slow
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=bodies | json_values)
def test_fuzzed_prompt_bodies_never_500(client, body):
    response = client.post("/prompt", content=json.dumps(body))
    assert response.status_code in (200, 400), (response.status_code, response.text)
    data = response.json()
    if response.status_code == 200:
        assert set(data) == {"prompt_id", "number", "node_errors"}
    else:
        assert set(data) == {"error", "node_errors"} and set(data["error"]) >= {"type", "message"}


ui_nodes = st.fixed_dictionaries(
    {"id": st.integers(0, 5) | st.text(max_size=3), "type": class_types | st.text(max_size=5)},
    optional={"inputs": st.lists(json_values, max_size=3), "outputs": st.lists(json_values, max_size=3),
              "widgets_values": st.lists(json_values, max_size=4) | json_values, "mode": st.integers(0, 4)})
ui_workflows = st.fixed_dictionaries(
    {"nodes": st.lists(ui_nodes, max_size=4),
     "links": st.lists(st.lists(st.integers(0, 5) | st.text(max_size=3), max_size=6), max_size=4) | json_values},
    optional={"version": json_values, "definitions": json_values, "extra": json_values})


@pytest.mark.slow
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(workflow=ui_workflows)
def test_fuzzed_ui_workflows_never_500(client, workflow):
    response = client.post("/prompt", content=json.dumps({"prompt": workflow}))
    assert response.status_code in (200, 400), (response.status_code, response.text)
    if response.status_code == 400:
        assert set(response.json()["error"]) >= {"type", "message", "details"}
