"""UI <-> API workflow conversion against hand-written fixtures and a hand-made core SD catalogue."""

from __future__ import annotations

import copy
import json
import random
from datetime import datetime
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from latentloom.engine.workflow import MissingNodeTypesError, WorkflowFormatError, api_to_ui, ui_to_api
from latentloom.engine.workflow.catalogue import node_layout
from latentloom.engine.workflow.text import format_date, js_string, process_dynamic_prompt

FIXTURES = Path(__file__).parent / "workflow_fixtures"
CATALOGUE = json.loads((FIXTURES / "catalogue.json").read_text())
FIXTURE_NAMES = sorted(p.name.removesuffix(".ui.json") for p in FIXTURES.glob("*.ui.json"))


def load_fixture(name: str) -> tuple[dict, dict]:
    ui = json.loads((FIXTURES / f"{name}.ui.json").read_text())
    api = json.loads((FIXTURES / f"{name}.api.json").read_text())
    return ui, api


def renumbered(prompt: dict, mapping: dict[str, str]) -> dict:
    """The prompt with node ids (and the link references to them) renamed through `mapping`."""
    out = {}
    for node_id, entry in prompt.items():
        inputs = {
            name: [mapping[value[0]], value[1]] if isinstance(value, list) and len(value) == 2 and value[0] in mapping
            else value
            for name, value in entry["inputs"].items()
        }
        out[mapping[node_id]] = {**entry, "inputs": inputs}
    return out


def test_fixture_set_covers_every_feature():
    assert {"notes_groups_seed", "reroute_chain", "bypass", "mute", "primitive_node", "converted_widget",
            "subgraph_nested"} <= set(FIXTURE_NAMES)


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_ui_fixture_converts_to_expected_api(name):
    ui, expected = load_fixture(name)
    assert ui_to_api(ui, CATALOGUE) == expected


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_fixture_round_trip_ui_api_ui_api_is_stable(name):
    ui, _ = load_fixture(name)
    first = ui_to_api(ui, CATALOGUE)
    second = ui_to_api(api_to_ui(first, CATALOGUE), CATALOGUE)
    if all(node_id.isdigit() for node_id in first):
        assert second == first
    else:
        # Flattened subgraph ids ("12:5:3") cannot be editor node ids; they are renumbered, nothing else changes.
        assert len(second) == len(first)
        mapping = dict(zip(first, second, strict=False))
        assert all(a == b for a, b in mapping.items() if a.isdigit())
        assert renumbered(first, mapping) == second
        third = ui_to_api(api_to_ui(second, CATALOGUE), CATALOGUE)
        assert third == second


def test_output_is_in_execution_order():
    ui, _ = load_fixture("subgraph_nested")
    prompt = ui_to_api(ui, CATALOGUE)
    position = {node_id: index for index, node_id in enumerate(prompt)}
    for node_id, entry in prompt.items():
        for value in entry["inputs"].values():
            if isinstance(value, list):
                assert position[value[0]] < position[node_id]


def test_unknown_node_types_are_refused_with_all_names():
    ui, _ = load_fixture("notes_groups_seed")
    ui["nodes"][1]["type"] = "FancyUpscaler"
    ui["nodes"][2]["type"] = "AnotherMissingNode"
    with pytest.raises(MissingNodeTypesError) as caught:
        ui_to_api(ui, CATALOGUE)
    assert caught.value.missing == ["AnotherMissingNode", "FancyUpscaler"]
    assert "AnotherMissingNode" in str(caught.value) and "FancyUpscaler" in str(caught.value)


def test_primitive_node_wired_to_a_subgraph_instance_does_not_reach_inside():
    # The editor resolves the inner input through the instance's (now linked) input to the virtual
    # PrimitiveNode, finds nothing, and keeps the inner widget's own value (checked with the frontend).
    ui, expected = load_fixture("subgraph_nested")
    ui["nodes"].append({"id": 30, "type": "PrimitiveNode", "mode": 0, "inputs": [],
                        "outputs": [{"name": "STRING", "type": "STRING", "widget": {"name": "text"}, "links": [30]}],
                        "widgets_values": ["a lighthouse"]})
    instance = next(n for n in ui["nodes"] if n["id"] == 12)
    instance["inputs"][2]["link"] = 30
    ui["links"].append([30, 30, 0, 12, 2, "STRING"])
    prompt = ui_to_api(ui, CATALOGUE)
    assert prompt["12:1"]["inputs"]["text"] == "inner default prompt"
    assert {k: v for k, v in prompt.items() if k != "12:1"} == {k: v for k, v in expected.items() if k != "12:1"}


def test_legacy_group_nodes_get_a_hint():
    ui, _ = load_fixture("notes_groups_seed")
    ui["nodes"][1]["type"] = "workflow>MyGroup"
    with pytest.raises(MissingNodeTypesError, match="legacy group nodes"):
        ui_to_api(ui, CATALOGUE)


def test_unknown_type_inside_a_subgraph_is_refused():
    ui, _ = load_fixture("subgraph_nested")
    ui["definitions"]["subgraphs"][1]["nodes"][0]["type"] = "EmptyFluxLatent"
    with pytest.raises(MissingNodeTypesError, match="EmptyFluxLatent"):
        ui_to_api(ui, CATALOGUE)


def test_unknown_slotless_decoration_and_muted_unknown_nodes_are_ignored():
    ui, expected = load_fixture("notes_groups_seed")
    ui["nodes"].append({"id": 40, "type": "Label (somepack)", "mode": 0, "inputs": [], "outputs": [],
                        "widgets_values": ["Title"]})
    ui["nodes"].append({"id": 41, "type": "MissingButMuted", "mode": 2,
                        "inputs": [{"name": "image", "type": "IMAGE", "link": None}], "outputs": []})
    assert ui_to_api(ui, CATALOGUE) == expected


def test_bypassed_unknown_node_is_passed_through_by_slot_types():
    ui, expected = load_fixture("bypass")
    lora = next(n for n in ui["nodes"] if n["id"] == 10)
    lora["type"] = "SomeCustomLoraStack"
    assert ui_to_api(ui, CATALOGUE) == expected


def test_set_and_get_nodes_act_as_named_links():
    ui, expected = load_fixture("reroute_chain")
    nodes = {n["id"]: n for n in ui["nodes"]}
    nodes[20].update(type="SetNode", widgets_values=["main_vae"], title="Set_main_vae")
    nodes[20]["outputs"][0]["links"] = []
    nodes[21].update(type="GetNode", widgets_values=["main_vae"], inputs=[])
    ui["links"] = [link for link in ui["links"] if link[0] != 12]
    assert ui_to_api(ui, CATALOGUE) == expected
    nodes[21]["widgets_values"] = ["no_such_name"]
    assert "vae" not in ui_to_api(ui, CATALOGUE)["8"]["inputs"]


def test_broken_link_reference_is_a_clear_error():
    ui, _ = load_fixture("reroute_chain")
    ui["links"] = [link for link in ui["links"] if link[0] != 12]
    with pytest.raises(WorkflowFormatError, match="missing link 12"):
        ui_to_api(ui, CATALOGUE)


def test_not_a_ui_workflow():
    with pytest.raises(WorkflowFormatError, match="nodes"):
        ui_to_api({"3": {"class_type": "KSampler", "inputs": {}}}, CATALOGUE)


def test_named_widget_values_are_read_by_name():
    ui, expected = load_fixture("notes_groups_seed")
    sampler = next(n for n in ui["nodes"] if n["id"] == 3)
    sampler["widgets_values"] = {"seed": 156680208700286, "control_after_generate": "fixed", "steps": 24, "cfg": 6.5,
                                 "sampler_name": "dpmpp_2m", "scheduler": "karras", "denoise": 0.85}
    assert ui_to_api(ui, CATALOGUE) == expected


def test_missing_widget_values_fall_back_to_catalogue_defaults():
    ui, _ = load_fixture("notes_groups_seed")
    next(n for n in ui["nodes"] if n["id"] == 5)["widgets_values"] = [640]
    latent = ui_to_api(ui, CATALOGUE)["5"]["inputs"]
    assert latent == {"width": 640, "height": 512, "batch_size": 1}


def test_empty_title_falls_back_to_display_name():
    ui, _ = load_fixture("notes_groups_seed")
    next(n for n in ui["nodes"] if n["id"] == 6)["title"] = ""
    assert ui_to_api(ui, CATALOGUE)["6"]["_meta"]["title"] == "CLIP Text Encode (Prompt)"


def test_widget_inputs_without_a_widget_are_dropped_like_the_editor_does():
    ui, expected = load_fixture("notes_groups_seed")
    sampler = next(n for n in ui["nodes"] if n["id"] == 3)
    # Stale converted-widget inputs naming widgets the node type no longer has. The editor removes them
    # while iterating over the list it removes from, so the slot after each removed one is skipped (kept).
    sampler["inputs"] += [
        {"name": f"old_{letter}", "type": "LATENT", "widget": {"name": f"old_{letter}"}, "link": link_id}
        for letter, link_id in (("a", 20), ("b", 21), ("c", 22))
    ]
    ui["links"] += [[link_id, 5, 0, 3, slot, "LATENT"] for slot, link_id in enumerate((20, 21, 22), start=4)]
    prompt = ui_to_api(ui, CATALOGUE)
    assert prompt["3"]["inputs"] == {**expected["3"]["inputs"], "old_b": ["5", 0]}


def test_list_widget_values_are_wrapped():
    ui, _ = load_fixture("notes_groups_seed")
    next(n for n in ui["nodes"] if n["id"] == 9)["widgets_values"] = [["a", "b"]]
    assert ui_to_api(ui, CATALOGUE)["9"]["inputs"]["filename_prefix"] == {"__value__": ["a", "b"]}


def test_widget_layout_places_companion_widgets():
    layout = node_layout("KSamplerAdvanced", CATALOGUE)
    assert [w.name for w in layout.persisted_widgets] == [
        "add_noise", "noise_seed", "control_after_generate", "steps", "cfg", "sampler_name", "scheduler",
        "start_at_step", "end_at_step", "return_with_leftover_noise"]
    assert [w.name for w in node_layout("LoadImageMask", CATALOGUE).persisted_widgets] == ["image", "channel", "upload"]
    assert [s.name for s in node_layout("ControlNetApplyAdvanced", CATALOGUE).sockets] == [
        "positive", "negative", "control_net", "image", "vae"]


def test_dynamic_prompt_syntax():
    rng = random.Random(0)
    assert process_dynamic_prompt("plain text", rng) == "plain text"
    assert process_dynamic_prompt("a /* block */cat // trailing", rng) == "a cat "
    assert process_dynamic_prompt("line one // c\nline two", rng) == "line one \nline two"
    assert process_dynamic_prompt(r"literal \{braces\} and \| bar", rng) == "literal {braces} and | bar"
    seen = {process_dynamic_prompt("{red|green|{blue|cyan}} fox", random.Random(seed)) for seed in range(200)}
    assert seen == {"red fox", "green fox", "blue fox", "cyan fox"}


def test_dynamic_prompts_apply_only_to_flagged_widgets():
    ui, _ = load_fixture("notes_groups_seed")
    next(n for n in ui["nodes"] if n["id"] == 6)["widgets_values"] = ["{only}"]
    next(n for n in ui["nodes"] if n["id"] == 9)["widgets_values"] = ["{kept}"]
    prompt = ui_to_api(ui, CATALOGUE, rng=random.Random(1))
    assert prompt["6"]["inputs"]["text"] == "only"
    assert prompt["9"]["inputs"]["filename_prefix"] == "{kept}"


def test_save_node_filename_prefix_replacements():
    ui, _ = load_fixture("notes_groups_seed")
    save = next(n for n in ui["nodes"] if n["id"] == 9)
    save["widgets_values"] = ["%date:yyyy-MM-dd%/%date:hh-mm-ss%_%KSampler.seed%_%Positive.text%_%Nope.x%_%width%"
                              "_%date:d.M.yy%_%EmptyLatentImage.batch_size%_%Load Checkpoint.ckpt_name%"]
    prompt = ui_to_api(ui, CATALOGUE, now=datetime(2026, 3, 4, 9, 5, 7))
    # (checked against the frontend: a pattern with dots but no widget keeps only the first date field)
    assert prompt["9"]["inputs"]["filename_prefix"] == (
        "2026-03-04/09-05-07_156680208700286_a photo of a red fox in the snow_%Nope.x%_%width%_4_2"
        "_v1-5-pruned-emaonly.safetensors")


def test_text_replacement_helpers():
    moment = datetime(2031, 12, 1, 17, 4, 9)
    assert format_date("yyyy/yy/M/MM/d/dd/h/hh/m/mm/s/ss/yyy", moment) == "2031/31/12/12/1/01/17/17/4/04/9/09/yyy"
    assert [js_string(v) for v in (None, True, 2.0, 2.5, "x")] == ["", "true", "2", "2.5", "x"]


# --- API -> UI --------------------------------------------------------------------------------------------


def test_api_to_ui_layout_and_structure():
    _, api = load_fixture("notes_groups_seed")
    ui = api_to_ui(api, CATALOGUE)
    assert ui["version"] == 0.4
    nodes = {node["id"]: node for node in ui["nodes"]}
    assert set(nodes) == {3, 4, 5, 6, 7, 8, 9}
    assert ui["last_node_id"] == 9
    assert ui["last_link_id"] == len(ui["links"]) == 9
    # Every link goes left to right, and its ends agree with the nodes' slots.
    for link_id, source, source_slot, target, target_slot, link_type in ui["links"]:
        assert nodes[source]["pos"][0] + nodes[source]["size"][0] < nodes[target]["pos"][0]
        assert link_id in nodes[source]["outputs"][source_slot]["links"]
        assert nodes[target]["inputs"][target_slot]["link"] == link_id
        assert nodes[source]["outputs"][source_slot]["type"] == link_type
    # Nodes sharing a column do not overlap.
    by_column: dict[float, list[dict]] = {}
    for node in ui["nodes"]:
        by_column.setdefault(node["pos"][0], []).append(node)
    for column in by_column.values():
        column.sort(key=lambda n: n["pos"][1])
        for upper, lower in zip(column, column[1:], strict=False):
            assert upper["pos"][1] + upper["size"][1] <= lower["pos"][1]
    assert nodes[3]["widgets_values"] == [156680208700286, "fixed", 24, 6.5, "dpmpp_2m", "karras", 0.85]
    assert nodes[6]["title"] == "Positive"
    assert nodes[4]["properties"]["cnr_id"] == "comfy-core"


def test_api_to_ui_layers_follow_longest_path():
    _, api = load_fixture("notes_groups_seed")
    nodes = {n["id"]: n for n in api_to_ui(api, CATALOGUE)["nodes"]}
    columns = sorted({n["pos"][0] for n in nodes.values()})
    column_of = {node_id: columns.index(n["pos"][0]) for node_id, n in nodes.items()}
    # The checkpoint starts; encoders next; the sampler after the encoders, with the input-less latent
    # moved right beside the encoders, just before the sampler that uses it.
    assert column_of[4] == 0
    assert column_of[6] == column_of[7] == column_of[5] == 1
    assert (column_of[3], column_of[8], column_of[9]) == (2, 3, 4)


def test_api_to_ui_linked_widget_gets_an_input_slot_and_default_value():
    _, api = load_fixture("converted_widget")
    nodes = {n["id"]: n for n in api_to_ui(api, CATALOGUE)["nodes"]}
    sampler = nodes[3]
    cfg_input = next(i for i in sampler["inputs"] if i["name"] == "cfg")
    assert cfg_input["widget"] == {"name": "cfg"} and cfg_input["link"] is not None
    assert sampler["widgets_values"][3] == 8.0  # catalogue default stands in for the linked value
    assert nodes[16]["widgets_values"] == ["mask.png", "red", "image"]


def test_api_to_ui_reports_inputs_it_cannot_place():
    _, api = load_fixture("notes_groups_seed")
    api = copy.deepcopy(api)
    api["9"]["inputs"]["not_an_input"] = 3
    ui = api_to_ui(api, CATALOGUE)
    assert any("not_an_input" in w for w in ui["extra"]["conversion_warnings"])


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda p: p["3"].update(class_type="NoSuchSampler"), "NoSuchSampler"),
        (lambda p: p["3"]["inputs"].update(model=["99", 0]), "'99'"),
        (lambda p: p["3"]["inputs"].update(model=["4", 7]), "output 7"),
        (lambda p: p["4"]["inputs"].update(ckpt_name=["9", 0]), "cycle"),
        (lambda p: p.clear(), "non-empty"),
    ],
)
def test_api_to_ui_errors(mutate, message):
    _, api = load_fixture("notes_groups_seed")
    api = copy.deepcopy(api)
    mutate(api)
    with pytest.raises(WorkflowFormatError, match=message):
        api_to_ui(api, CATALOGUE)


# --- Property: random DAGs of catalogue nodes survive API -> UI -> API unchanged ------------------------

SAFE_TEXT = st.text(alphabet=st.characters(blacklist_characters="{}|\\/", blacklist_categories=("Cs",)), max_size=20)
PRIMITIVE_FOR = {"INT": "PrimitiveInt", "FLOAT": "PrimitiveFloat", "STRING": "PrimitiveString",
                 "BOOLEAN": "PrimitiveBoolean"}


@st.composite
def widget_value(draw, spec: list):
    type_name = spec[0]
    options = spec[1] if len(spec) > 1 else {}
    if isinstance(type_name, list):
        return draw(st.sampled_from(type_name))
    if type_name == "INT":
        return draw(st.integers(options.get("min", -(2**63)), options.get("max", 2**63)))
    if type_name == "FLOAT":
        return draw(st.floats(max(float(options.get("min", -1e9)), -1e9), min(float(options.get("max", 1e9)), 1e9)))
    if type_name == "BOOLEAN":
        return draw(st.booleans())
    return draw(SAFE_TEXT)


@st.composite
def random_prompt(draw):
    class_types = sorted(CATALOGUE)
    prompt: dict[str, dict] = {}
    outputs_by_type: dict[str, list[list]] = {}
    used_ids = draw(st.lists(st.integers(1, 500), min_size=1, max_size=12, unique=True))
    for node_id in map(str, used_ids):
        class_type = draw(st.sampled_from(class_types))
        entry = CATALOGUE[class_type]
        inputs = {}
        specs = {**entry["input"].get("required", {}), **entry["input"].get("optional", {})}
        for name, spec in specs.items():
            type_name = spec[0]
            sources = outputs_by_type.get(type_name if isinstance(type_name, str) else "COMBO", [])
            if isinstance(type_name, list) or type_name in ("INT", "FLOAT", "STRING", "BOOLEAN"):
                primitive_sources = [s for s in sources if prompt[s[0]]["class_type"] == PRIMITIVE_FOR.get(type_name)]
                if primitive_sources and draw(st.booleans()):
                    inputs[name] = list(draw(st.sampled_from(primitive_sources)))
                else:
                    inputs[name] = draw(widget_value(spec))
            elif sources and draw(st.integers(0, 4)) > 0:
                inputs[name] = list(draw(st.sampled_from(sources)))
        # (an empty title means "no title" to the editor, which then shows the display name)
        title = draw(st.one_of(st.just(entry["display_name"]), SAFE_TEXT.filter(bool)))
        prompt[node_id] = {"inputs": inputs, "class_type": class_type, "_meta": {"title": title}}
        for slot, out_type in enumerate(entry["output"]):
            outputs_by_type.setdefault(out_type, []).append([node_id, slot])
    return prompt


@pytest.mark.slow
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_prompt())
def test_random_prompts_survive_api_ui_api(prompt):
    ui = api_to_ui(prompt, CATALOGUE)
    assert "conversion_warnings" not in ui["extra"]
    back = ui_to_api(ui, CATALOGUE)
    assert back == prompt
    # and one more lap through the editor format changes nothing
    assert ui_to_api(api_to_ui(back, CATALOGUE), CATALOGUE) == prompt


PASS_THROUGH = {"IMAGE": "ImageInvert", "CONDITIONING": "ConditioningZeroOut", "LATENT": "RepeatLatentBatch",
                "MODEL": "ModelSamplingDiscrete", "CLIP": "CLIPSetLastLayer"}


def _insert_on_link(ui: dict, link: list, node_type: str, mode: int) -> None:
    """Splice a new node (a Reroute, or a pass-through node in `mode`) into an existing link."""
    link_id, _, _, target, target_slot, link_type = link
    new_id = ui["last_node_id"] = ui["last_node_id"] + 1
    new_link = ui["last_link_id"] = ui["last_link_id"] + 1
    if node_type == "Reroute":
        inputs = [{"name": "", "type": "*", "link": link_id}]
        outputs = [{"name": "", "type": link_type, "links": [new_link]}]
        widgets = None
    else:
        layout = node_layout(node_type, CATALOGUE)
        inputs = [{"name": s.name, "type": s.type, "link": link_id if i == 0 else None}
                  for i, s in enumerate(layout.sockets)]
        outputs = [{"name": o.name, "type": o.type, "links": [new_link] if i == 0 else []}
                   for i, o in enumerate(layout.outputs)]
        widgets = [w.default for w in layout.persisted_widgets]
    ui["nodes"].append({"id": new_id, "type": node_type, "pos": [0, 0], "size": [100, 40], "flags": {}, "order": 0,
                        "mode": mode, "inputs": inputs, "outputs": outputs, "properties": {},
                        **({"widgets_values": widgets} if widgets is not None else {})})
    link[3], link[4] = new_id, 0
    ui["links"].append([new_link, new_id, 0, target, target_slot, link_type])
    target_node = next(n for n in ui["nodes"] if n["id"] == target)
    target_node["inputs"][target_slot]["link"] = new_link


@st.composite
def decorated_workflow(draw):
    prompt = draw(random_prompt())
    ui = api_to_ui(prompt, CATALOGUE)
    for link in list(ui["links"]):
        for _ in range(draw(st.integers(0, 2))):
            choice = draw(st.sampled_from(["Reroute", "bypass"]))
            if choice == "bypass" and link[5] in PASS_THROUGH:
                _insert_on_link(ui, link, PASS_THROUGH[link[5]], mode=4)
            else:
                _insert_on_link(ui, link, "Reroute", mode=0)
    extra_id = ui["last_node_id"] + 1
    ui["nodes"].append({"id": extra_id, "type": "Note", "mode": 0, "inputs": [], "outputs": [],
                        "widgets_values": [draw(SAFE_TEXT)]})
    ui["nodes"].append({"id": extra_id + 1, "type": "VAEDecode", "mode": 2, "inputs": [
        {"name": "samples", "type": "LATENT", "link": None}, {"name": "vae", "type": "VAE", "link": None}],
        "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": []}]})
    ui["groups"].append({"id": 1, "title": draw(SAFE_TEXT), "bounding": [0, 0, 100, 100]})
    return prompt, ui


@pytest.mark.slow
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(decorated_workflow())
def test_reroutes_bypassed_pass_throughs_notes_and_muted_nodes_change_nothing(case):
    prompt, ui = case
    assert ui_to_api(ui, CATALOGUE) == prompt
