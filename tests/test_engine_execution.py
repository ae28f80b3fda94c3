"""Execution conformance: the behaviours of ComfyUI's execution tests (docs/comfyui-reference.md#execution-behaviour),
re-created with scalar nodes, plus interrupts and the cases ComfyUI gets wrong."""

import asyncio
import threading
import time

import pytest
from engine_helpers import add, collect, const, make_engine

from latentloom.engine.events import EventRecorder
from latentloom.engine.run_state import InterruptToken


@pytest.fixture
def setup(tmp_path):
    return make_engine(tmp_path)


def run_ok(engine, prompt, **kwargs):
    result = engine.run(prompt, **kwargs)
    assert result.ok, getattr(result, "error", None) or getattr(result, "node_errors", None)
    return result


# Caching ---------------------------------------------------------------------------------------------------------

def test_rerun_of_unchanged_graph_executes_nothing(setup):
    engine, calls = setup
    prompt = {"1": const(1), "2": add("1", 2), "3": collect("2")}
    first = run_ok(engine, prompt)
    assert calls == ["1", "2", "3"] and first.outputs == {"3": {"values": [3.0]}}
    calls.clear()
    recorder = EventRecorder()
    second = run_ok(engine, prompt, listener=recorder)
    assert calls == []
    assert second.outputs == first.outputs  # cached UI served
    (cached,) = recorder.of(type(recorder.events[1]))
    assert sorted(cached.nodes) == ["1", "2", "3"]
    assert recorder.types() == ["execution_start", "execution_cached", "executed", "execution_success"]


def test_one_constant_changed_reruns_only_descendants(setup):
    engine, calls = setup
    prompt = {"1": const(1), "2": const(5), "3": add("1", 1), "4": {"class_type": "Mix", "inputs": {
        "first": ["3", 0], "second": ["2", 0], "mask": 0.5}}, "5": collect("4")}
    run_ok(engine, prompt)
    calls.clear()
    prompt["3"]["inputs"]["b"] = 2
    result = run_ok(engine, prompt)
    assert sorted(calls) == ["3", "4", "5"]
    assert result.outputs["5"]["values"] == [(1 + 2) * 0.5 + 5 * 0.5]


def test_renumbered_graph_hits_the_cache(setup):
    engine, calls = setup
    run_ok(engine, {"1": const(1), "2": add("1", 2), "3": collect("2")})
    calls.clear()
    run_ok(engine, {"a": const(1), "b": add("a", 2), "c": collect("b")})
    assert calls == []


def test_fingerprint_sees_a_changed_file(setup, tmp_path):
    engine, calls = setup
    path = tmp_path / "n.txt"
    path.write_text("4")
    prompt = {"1": {"class_type": "ReadFile", "inputs": {"path": str(path)}}, "2": collect("1")}
    assert run_ok(engine, prompt).outputs["2"]["values"] == [4.0]
    calls.clear()
    run_ok(engine, prompt)
    assert calls == []
    path.write_text("7")
    assert run_ok(engine, prompt).outputs["2"]["values"] == [7.0]
    assert calls == ["1", "2"]


def test_non_deterministic_node_always_runs(setup):
    engine, calls = setup
    prompt = {"1": {"class_type": "Random", "inputs": {"scale": 1.0}}, "2": add("1"), "3": collect("2")}
    run_ok(engine, prompt)
    calls.clear()
    run_ok(engine, prompt)
    assert calls == ["1", "2", "3"]


def test_byte_budget_evicts_least_recently_used(tmp_path):
    engine, calls = make_engine(tmp_path, cache_bytes=400)
    for value in range(20):
        run_ok(engine, {"1": const(value), "2": collect("1")})
    stats = engine.cache.stats()
    assert stats.bytes <= 400 and stats.evictions > 0
    calls.clear()
    run_ok(engine, {"1": const(19), "2": collect("1")})  # the most recent survives
    assert calls == []
    run_ok(engine, {"1": const(0), "2": collect("1")})  # the oldest was evicted
    assert calls == ["1", "2"]


def test_outputs_no_recent_prompt_needed_age_out(tmp_path):
    engine, calls = make_engine(tmp_path, cache_prompts=2)  # keep what the last two prompts needed
    graph_a = {"1": const(100), "2": add("1", 1), "3": collect("2")}

    def other(value):
        return {"1": const(value), "2": collect("1")}

    run_ok(engine, graph_a)  # prompt 1
    run_ok(engine, other(7))  # 2
    calls.clear()
    run_ok(engine, graph_a)  # 3: prompt 1's outputs are within the last two prompts
    assert calls == []
    run_ok(engine, other(8))  # 4
    calls.clear()
    # 5: const(100) was only read at prompt 1, but prompt 3 needed it (its cached descendants) and kept it alive
    run_ok(engine, {"1": const(100), "2": add("1", 5), "3": collect("2")})
    assert calls == ["2", "3"]
    run_ok(engine, other(9))  # 6
    run_ok(engine, other(10))  # 7
    calls.clear()
    run_ok(engine, graph_a)  # 8: Add and Collect were last needed at prompt 3 and aged out; const(100) (prompt 5)
    assert calls == ["2", "3"]  # is still there when this prompt, which needs it, begins
    assert engine.cache.stats().entries == 3 + 2 + 2  # this prompt's, prompt 7's and prompt 6's
    run_ok(engine, other(11))  # 9
    run_ok(engine, other(12))  # 10
    run_ok(engine, other(13))  # 11
    calls.clear()
    run_ok(engine, graph_a)  # 12: nothing of it was needed by prompts 9-11
    assert calls == ["1", "2", "3"]


def test_cache_without_an_age_limit_keeps_every_prompt_within_the_budget(tmp_path):
    engine, calls = make_engine(tmp_path, cache_prompts=None)
    for value in range(30):
        run_ok(engine, {"1": const(value), "2": collect("1")})
    calls.clear()
    run_ok(engine, {"1": const(0), "2": collect("1")})
    assert calls == [] and engine.cache.stats().entries == 60


def test_intermediate_values_are_released_once_consumed(setup):
    engine, _ = setup
    prompt = {"blob": {"class_type": "MakeBlob", "inputs": {"seed": 1}},
              "use": {"class_type": "UseBlob", "inputs": {"blob": ["blob", 0]}},
              "step": add("use", 1), "live": {"class_type": "LiveBlobs", "inputs": {"value": ["step", 0]}},
              "out": collect("live")}
    assert run_ok(engine, prompt).outputs["out"]["values"] == [0.0]  # the blob was gone before "live" ran


def test_two_identical_outputs_each_report(setup):
    engine, _ = setup
    result = run_ok(engine, {"1": const(2), "2": collect("1"), "3": collect("1")})
    assert result.outputs == {"2": {"values": [2.0]}, "3": {"values": [2.0]}}


# Lazy inputs -----------------------------------------------------------------------------------------------------

def test_lazy_input_not_needed_never_runs(setup):
    engine, calls = setup
    prompt = {"1": const(0), "2": const(1), "3": {"class_type": "Mix", "inputs": {
        "first": ["1", 0], "second": ["2", 0], "mask": 0.0}}, "4": collect("3")}
    result = run_ok(engine, prompt)
    assert "2" not in calls and result.outputs["4"]["values"] == [0.0]


def test_lazy_needs_are_unioned_over_list_elements(setup):
    engine, calls = setup
    prompt = {"m0": const(0.0), "m1": const(0.5), "m2": const(1.0),
              "list": {"class_type": "MakeList", "inputs": {"a": ["m0", 0], "b": ["m1", 0], "c": ["m2", 0]}},
              "black": const(0), "white": const(255),
              "mix": {"class_type": "Mix", "inputs": {"first": ["black", 0], "second": ["white", 0],
                                                      "mask": 0.5}},
              "out": collect("mix")}
    result = run_ok(engine, prompt)
    assert result.outputs["out"]["values"] == [127.5]
    assert {"black", "white"} <= set(calls)


def test_partial_run_with_lazy_mix(setup):
    engine, calls = setup
    prompt = {"1": const(0), "2": const(1), "3": {"class_type": "Mix", "inputs": {
        "first": ["1", 0], "second": ["2", 0], "mask": 0.0}}, "4": collect("3"), "5": const(9), "6": collect("5")}
    run_ok(engine, prompt, targets=["4"])
    assert set(calls) == {"1", "3", "4"}


# Partial execution -----------------------------------------------------------------------------------------------

def test_partial_targets(setup):
    engine, calls = setup
    prompt = {"1": const(1), "2": collect("1"), "3": const(2), "4": collect("3"), "5": const(3), "6": collect("5")}
    result = run_ok(engine, prompt, targets=["2", "6"])
    assert sorted(calls) == ["1", "2", "5", "6"] and set(result.outputs) == {"2", "6"}


def test_output_node_with_socket_output_runs_as_dependency(setup):
    engine, calls = setup
    prompt = {"1": const(1), "2": {"class_type": "Passthrough", "inputs": {"value": ["1", 0]}},
              "3": {"class_type": "Passthrough", "inputs": {"value": ["2", 0]}}, "4": collect("3"),
              "5": const(7), "6": collect("5")}
    run_ok(engine, prompt, targets=["4"])
    assert calls == ["1", "2", "3", "4"]


# Lists and blockers ----------------------------------------------------------------------------------------------

def test_list_mapping_repeats_the_last_element(setup):
    engine, _ = setup
    prompt = {"a0": const(0), "a1": const(1), "a2": const(2), "b0": const(10), "b1": const(11),
              "la": {"class_type": "MakeList", "inputs": {"a": ["a0", 0], "b": ["a1", 0], "c": ["a2", 0]}},
              "lb": {"class_type": "MakeList", "inputs": {"a": ["b0", 0], "b": ["b1", 0]}},
              "pair": {"class_type": "Pair", "inputs": {"a": ["la", 0], "b": ["lb", 0]}}, "out": collect("pair")}
    result = run_ok(engine, prompt)
    assert result.outputs["out"]["values"] == ["0.0/10.0", "1.0/11.0", "2.0/11.0"]


def test_input_is_list_receives_whole_list(setup):
    engine, calls = setup
    prompt = {"a": const(1), "b": const(2), "c": const(3),
              "list": {"class_type": "MakeList", "inputs": {"a": ["a", 0], "b": ["b", 0], "c": ["c", 0]}},
              "sum": {"class_type": "Sum", "inputs": {"values": ["list", 0]}}, "out": collect("sum")}
    result = run_ok(engine, prompt)
    assert result.outputs["out"]["values"] == [6.0] and calls.count("sum") == 1


def test_blocker_drops_only_blocked_elements(setup):
    engine, calls = setup
    prompt = {"a": const(1), "b": const(2), "c": const(3),
              "list": {"class_type": "MakeList", "inputs": {"a": ["a", 0], "b": ["b", 0], "c": ["c", 0]}},
              "gate": {"class_type": "Gate", "inputs": {"value": ["list", 0], "block": False}},
              "plus": add("gate", 10), "out": collect("plus")}
    assert run_ok(engine, prompt).outputs["out"]["values"] == [11.0, 12.0, 13.0]
    prompt["gate"]["inputs"]["block"] = True
    result = run_ok(engine, prompt)
    assert "out" not in result.outputs  # every element blocked: the output node never ran


def test_blocked_list_elements_skip_downstream_calls(setup):
    engine, calls = setup
    prompt = {"a": const(1), "b": const(2), "c": const(3),
              "list": {"class_type": "MakeList", "inputs": {"a": ["a", 0], "b": ["b", 0], "c": ["c", 0]}},
              "gate": {"class_type": "BlockEqual", "inputs": {"value": ["list", 0], "blocked": 2}},
              "plus": add("gate", 100), "out": collect("plus")}
    result = run_ok(engine, prompt)
    assert result.outputs["out"]["values"] == [101.0, 103.0]
    assert calls.count("plus") == 2  # the blocked middle element was skipped


def test_blocker_with_a_message_reports_an_error_once_and_the_run_goes_on(setup):
    engine, calls = setup
    prompt = {"a": const(1), "b": const(2),
              "gate": {"class_type": "Gate", "inputs": {"value": ["a", 0], "block": True, "message": "no input"}},
              "plus": add("gate", 1), "more": add("plus", 1), "blocked_out": collect("more"),
              "free_out": collect("b")}
    recorder = EventRecorder()
    result = run_ok(engine, prompt, listener=recorder)
    assert result.status == "success" and result.outputs == {"free_out": {"values": [2.0]}}
    errors = [e.data() for e in recorder.events if e.type == "execution_error"]
    assert len(errors) == 1  # the node it stopped reports it; the blocker travels on without the message
    (error,) = errors
    assert error["node_id"] == "plus" and error["node_type"] == "Add"
    assert error["exception_message"] == "Execution Blocked: no input"
    assert error["exception_type"] == "ExecutionBlocked" and error["traceback"] == [] == error["current_inputs"]
    assert recorder.types()[-1] == "execution_success"
    # Without a message nothing is reported.
    prompt["gate"]["inputs"]["message"] = ""
    recorder = EventRecorder()
    run_ok(engine, prompt, listener=recorder)
    assert "execution_error" not in recorder.types()


def test_input_list_with_a_blocker_skips_the_call(setup):
    engine, calls = setup
    prompt = {"a": const(1), "b": const(2),
              "blocked": {"class_type": "Gate", "inputs": {"value": ["b", 0], "block": True}},
              "list": {"class_type": "MakeList", "inputs": {"a": ["a", 0], "b": ["blocked", 0]}},
              "out": collect("list")}
    result = run_ok(engine, prompt)
    assert "list" not in calls and "out" not in result.outputs


def test_undeclared_linked_inputs_are_passed_through(setup):
    engine, _ = setup
    prompt = {"a": const(1), "b": const(2), "c": const(4),
              "v": {"class_type": "Variadic", "inputs": {"first": ["a", 0], "input2": ["b", 0], "input3": ["c", 0],
                                                         "junk_constant": 99}}, "out": collect("v")}
    assert run_ok(engine, prompt).outputs["out"]["values"] == [7.0]


# Expansion -------------------------------------------------------------------------------------------------------

def test_expansion_runs_and_hits_the_cache_next_time(setup):
    engine, calls = setup
    prompt = {"1": const(1), "2": {"class_type": "Repeat", "inputs": {"value": ["1", 0], "times": 4, "step": 0.5}},
              "3": collect("2")}
    assert run_ok(engine, prompt).outputs["3"]["values"] == [3.0]
    assert [c for c in calls if c.startswith("2.")] == ["2.0.add0", "2.0.add1", "2.0.add2", "2.0.add3"]
    calls.clear()
    run_ok(engine, prompt)
    assert calls == []


def test_long_expansion_chain(setup):
    engine, _ = setup
    prompt = {"1": const(0), "2": {"class_type": "Repeat", "inputs": {"value": ["1", 0], "times": 1000, "step": 1}},
              "3": collect("2")}
    assert run_ok(engine, prompt).outputs["3"]["values"] == [1000.0]


def test_expansion_into_a_cycle_is_an_error_of_the_expanding_node(setup):
    engine, _ = setup
    prompt = {"1": const(1), "2": {"class_type": "CyclicExpand", "inputs": {"value": ["1", 0]}}, "3": collect("2")}
    result = engine.run(prompt)
    assert result.status == "error"
    assert result.error["node_id"] == "2" and "cycle" in result.error["exception_message"]


# Async -----------------------------------------------------------------------------------------------------------

def test_async_siblings_run_concurrently(setup):
    engine, _ = setup
    prompt = {"1": const(1)}
    for i, seconds in enumerate((0.3, 0.4, 0.5)):
        prompt[f"s{i}"] = {"class_type": "Sleep", "inputs": {"value": ["1", 0], "seconds": seconds}}
        prompt[f"o{i}"] = collect(f"s{i}")
    started = time.perf_counter()
    run_ok(engine, prompt)
    assert time.perf_counter() - started < 1.1  # sequential would take 1.2 s


def test_async_and_sync_chain_keeps_order(setup):
    engine, calls = setup
    prompt = {"1": const(1), "2": {"class_type": "Sleep", "inputs": {"value": ["1", 0], "seconds": 0.01}},
              "3": add("2", 1), "4": {"class_type": "Sleep", "inputs": {"value": ["3", 0], "seconds": 0.01}},
              "5": collect("4")}
    assert run_ok(engine, prompt).outputs["5"]["values"] == [2.0]
    assert calls == ["1", "2", "3", "4", "5"]


def test_async_error_names_the_node(setup):
    engine, _ = setup
    prompt = {"1": const(1), "2": {"class_type": "AsyncFail", "inputs": {"value": ["1", 0], "seconds": 0.05}},
              "3": collect("2"), "4": {"class_type": "Sleep", "inputs": {"value": ["1", 0], "seconds": 1.0}},
              "5": collect("4")}
    result = engine.run(prompt)
    assert result.status == "error" and result.error["node_id"] == "2"
    assert result.error["exception_type"] == "ValueError"


# Errors ----------------------------------------------------------------------------------------------------------

def test_input_error_is_named_after_the_node_and_input(setup):
    engine, calls = setup
    prompt = {"1": const(-1), "2": {"class_type": "Positive", "inputs": {"value": ["1", 0]}}, "3": collect("2")}
    result = engine.run(prompt)
    assert result.status == "error" and result.error["node_id"] == "2" and result.error["node_type"] == "Positive"
    assert result.error["exception_message"] == "Positive (#2): input 'value': must be positive, got -1.0"
    assert result.error["exception_type"] == "latentloom.engine.inputs.InputError"
    assert calls == ["1", "2"]


def test_value_checks_run_on_linked_socket_inputs_before_the_node(tmp_path):
    engine, calls = make_engine(tmp_path)
    engine.registry.value_checks.register("FLOAT", lambda v: None if v >= 0 else f"must not be negative (got {v})")
    prompt = {"1": const(-2), "2": add("1", b=-5), "3": collect("2")}
    result = engine.run(prompt)
    assert result.status == "error" and result.error["node_id"] == "2"
    assert result.error["exception_message"] == "Add (#2): input 'a': must not be negative (got -2.0)"
    assert calls == ["1"]  # Add never ran; its widget input b (-5) is not a linked socket and was not checked
    other, _ = make_engine(tmp_path)  # checks belong to one registry: another engine does not have them
    assert other.run(prompt).outputs == {"3": {"values": [-7.0]}}


def test_invalid_graph_gives_a_run_result_with_the_validation_errors(setup):
    engine, calls = setup
    result = engine.run({"1": add("9"), "2": collect("1")})
    assert result.status == "invalid" and not result.ok and calls == [] and result.executed == []
    assert result.error["type"] == "prompt_outputs_failed_validation"
    assert [error["type"] for error in result.node_errors["1"]["errors"]] == ["bad_linked_input"]
    assert result.node_errors["1"]["dependent_outputs"] == ["2"]


def test_runtime_error_event_and_recovery(setup):
    engine, calls = setup
    recorder = EventRecorder()
    prompt = {"1": const(1), "2": {"class_type": "Fail", "inputs": {"value": ["1", 0], "message": "bad"}},
              "3": collect("2")}
    result = engine.run(prompt, listener=recorder)
    assert result.status == "error"
    error = result.error
    assert error["node_id"] == "2" and error["node_type"] == "Fail"
    assert error["exception_message"] == "bad" and error["exception_type"] == "RuntimeError"
    assert error["executed"] == ["1"] and error["current_inputs"]["message"] == ["bad"]
    assert recorder.types()[-1] == "execution_error"
    # the node that finished keeps its cached result; a new graph runs fine
    calls.clear()
    assert run_ok(engine, {"1": const(1), "2": add("1", 1), "3": collect("2")}).outputs["3"]["values"] == [2.0]
    assert calls == ["2", "3"]


# Events ----------------------------------------------------------------------------------------------------------

def test_event_order_and_fields(setup):
    engine, _ = setup
    recorder = EventRecorder()
    run_ok(engine, {"1": const(1), "2": {"class_type": "Steps", "inputs": {"value": ["1", 0], "steps": 3,
                                                                           "pause": 0}}, "3": collect("2")},
           listener=recorder, prompt_id="p1")
    types = [t for t in recorder.types() if t != "progress_state"]
    assert types == ["execution_start", "execution_cached", "executing", "executing", "progress", "progress",
                     "progress", "executing", "executed", "execution_success"]
    progress = [e.data() for e in recorder.events if e.type == "progress"]
    assert progress[-1] == {"prompt_id": "p1", "value": 3, "max": 3, "node": "2"}
    executed = [e.data() for e in recorder.events if e.type == "executed"][0]
    assert executed == {"prompt_id": "p1", "node": "3", "display_node": "3", "output": {"values": [1.0]}}
    states = [e for e in recorder.events if e.type == "progress_state"]
    assert states[-1].nodes["3"].state == "finished"


# Interrupts ------------------------------------------------------------------------------------------------------

def test_interrupt_during_a_node(setup):
    engine, calls = setup
    token = InterruptToken()
    prompt = {"1": const(1), "2": {"class_type": "Steps", "inputs": {"value": ["1", 0], "steps": 500,
                                                                      "pause": 0.01}}, "3": collect("2")}
    threading.Timer(0.2, token.request).start()
    recorder = EventRecorder()
    started = time.perf_counter()
    result = engine.run(prompt, interrupt=token, listener=recorder)
    assert result.status == "interrupted" and time.perf_counter() - started < 2.0
    assert result.error["node_id"] == "2" and "3" not in calls
    assert recorder.types()[-1] == "execution_interrupted"
    token.clear()
    calls.clear()
    prompt["2"]["inputs"]["steps"] = 2
    assert run_ok(engine, prompt, interrupt=token).outputs["3"]["values"] == [1.0]


def test_interrupt_reaches_a_silent_async_node(setup):
    engine, _ = setup
    token = InterruptToken()
    prompt = {"1": const(1), "2": {"class_type": "Sleep", "inputs": {"value": ["1", 0], "seconds": 5}},
              "3": collect("2")}
    threading.Timer(0.2, token.request).start()
    started = time.perf_counter()
    assert engine.run(prompt, interrupt=token).status == "interrupted"
    assert time.perf_counter() - started < 2.0


def test_interrupt_aimed_at_another_run_does_not_stop_this_one(setup):
    engine, _ = setup
    other, mine = InterruptToken(), InterruptToken()
    other.request()
    assert run_ok(engine, {"1": const(1), "2": collect("1")}, interrupt=mine).ok


def test_two_engines_in_one_process_do_not_interfere(tmp_path):
    first, first_calls = make_engine(tmp_path / "a")
    second, second_calls = make_engine(tmp_path / "b")
    prompt = {"1": const(1), "2": {"class_type": "Sleep", "inputs": {"value": ["1", 0], "seconds": 0.2}},
              "3": collect("2")}
    results = {}

    def go(name, engine):
        results[name] = engine.run(prompt)

    threads = [threading.Thread(target=go, args=("a", first)), threading.Thread(target=go, args=("b", second))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results["a"].ok and results["b"].ok
    assert first_calls == second_calls == ["1", "2", "3"]


def test_run_async_inside_a_running_loop(setup):
    engine, _ = setup
    graph = engine.validate({"1": const(3), "2": collect("1")}).graph

    async def main():
        return await engine.executor.run_async(graph)

    assert asyncio.run(main()).outputs == {"2": {"values": [3.0]}}
