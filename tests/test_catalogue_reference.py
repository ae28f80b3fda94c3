"""Our node catalogue against ComfyUI 0.3.64's own /object_info (tests/data/comfyui-0.3.64-nodes.json, tooltips
and descriptions removed): every node type we have that ComfyUI has must carry ComfyUI's signature — input names
and order, types, combo options, defaults, ranges, outputs — so saved workflows and the editor's widgets line up.

What is compared as equivalent (the frontend treats both forms alike):
- a V3 node's `["COMBO", {"options": [...]}]` and a V1 node's `[[...], {}]`;
- a boolean option that is False on one side and absent on the other (`multiline`, `multiselect`);
- model-file combos (their options are the files on disk, different on every machine): only "a list" is compared;
- a display_name of null (ComfyUI shows the class name) and the class name itself.
We may add `tooltip`s, and a `default` where ComfyUI declares none.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from latentloom.nodes import create_engine

REFERENCE = json.loads((Path(__file__).parent / "data" / "comfyui-0.3.64-nodes.json").read_text())
SCOPE = REFERENCE["scope"]
FILE_COMBO_INPUTS = {"ckpt_name", "vae_name", "lora_name", "control_net_name", "image", "clip_name", "unet_name",
                     "model_name", "clip_name1", "clip_name2", "clip_name3", "clip_name4", "config_name",
                     "style_model_name", "gligen_name", "hypernetwork_name", "upscale_model", "photomaker_model_name"}
# In scope but not built yet: this set only shrinks. Issue 13 (part 1) and issue 14 (part 2) bring them.
NOT_YET_BUILT: set[str] = set()
# scope.model_families (issue 15) not built yet: one per line, this set only shrinks.
NOT_YET_BUILT_FAMILIES: set[str] = set()


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory) -> dict[str, dict[str, Any]]:
    root = tmp_path_factory.mktemp("catalogue")
    return create_engine(models_dir=root / "models", input_dir=root / "input", output_dir=root / "output",
                         temp_dir=root / "temp", entry_points=False).catalogue()


def _spec(spec: list[Any]) -> tuple[Any, dict[str, Any]]:
    type_name, options = spec[0], dict(spec[1]) if len(spec) > 1 else {}
    options.pop("tooltip", None)
    if type_name == "COMBO" and "options" in options:
        type_name = list(options.pop("options"))
    for flag in ("multiline", "multiselect"):
        if options.get(flag) is False:
            del options[flag]
    return type_name, options


def signature_problems(name: str, ours: dict[str, Any], theirs: dict[str, Any]) -> list[str]:
    problems = []
    for section in ("required", "optional"):
        our_inputs = ours["input"].get(section) or {}
        their_inputs = theirs["input"].get(section) or {}
        if list(our_inputs) != list(their_inputs):
            problems.append(f"{section} inputs {list(our_inputs)} != {list(their_inputs)}")
            continue
        for input_name, their_spec in their_inputs.items():
            our_type, our_options = _spec(our_inputs[input_name])
            their_type, their_options = _spec(their_spec)
            if input_name in FILE_COMBO_INPUTS and isinstance(their_type, list):
                if not isinstance(our_type, list):
                    problems.append(f"{input_name}: {our_type!r} is not a file combo")
                continue
            if our_type != their_type:
                problems.append(f"{input_name}: type {our_type!r} != {their_type!r}")
            for key, value in their_options.items():
                if our_options.get(key) != value:
                    problems.append(f"{input_name}.{key}: {our_options.get(key)!r} != {value!r}")
            extra = set(our_options) - set(their_options) - {"default"}
            if extra:
                problems.append(f"{input_name}: options {sorted(extra)} that ComfyUI does not declare")
    for key in ("output", "output_is_list", "output_name", "output_node", "category"):
        if ours.get(key) != theirs.get(key):
            problems.append(f"{key}: {ours.get(key)!r} != {theirs.get(key)!r}")
    if ours.get("display_name") != (theirs.get("display_name") or name) and theirs.get("display_name") is not None:
        problems.append(f"display_name: {ours.get('display_name')!r} != {theirs.get('display_name')!r}")
    return problems


def test_every_node_we_share_with_comfyui_has_its_signature(catalogue):
    problems = {name: signature_problems(name, entry, REFERENCE["nodes"][name])
                for name, entry in catalogue.items() if name in REFERENCE["nodes"]}
    problems = {name: found for name, found in problems.items() if found}
    assert not problems, json.dumps(problems, indent=1)


def test_the_image_and_utility_scope_is_covered(catalogue):
    wanted = set(SCOPE["image_core"]) | set(SCOPE["utility"])
    missing = wanted - set(catalogue)
    assert missing <= NOT_YET_BUILT, f"missing and not listed as not yet built: {sorted(missing - NOT_YET_BUILT)}"
    built_since = NOT_YET_BUILT & set(catalogue)
    assert not built_since, f"built now, remove from NOT_YET_BUILT: {sorted(built_since)}"



def test_the_model_families_scope_is_covered(catalogue):
    missing = set(SCOPE["model_families"]) - set(catalogue)
    assert missing <= NOT_YET_BUILT_FAMILIES, \
        f"missing and not listed as not yet built: {sorted(missing - NOT_YET_BUILT_FAMILIES)}"
    built_since = NOT_YET_BUILT_FAMILIES & set(catalogue)
    assert not built_since, f"built now, remove from NOT_YET_BUILT_FAMILIES: {sorted(built_since)}"

def test_the_comparison_catches_a_changed_signature(catalogue):
    entry = json.loads(json.dumps(catalogue["KSampler"]))
    entry["input"]["required"]["steps"][1]["max"] = 99
    entry["input"]["required"]["cfg"] = ["INT", {}]
    problems = signature_problems("KSampler", entry, REFERENCE["nodes"]["KSampler"])
    assert any(p.startswith("steps.max") for p in problems) and any(p.startswith("cfg: type") for p in problems)
