"""Convert every ComfyUI workflow template (editor/UI format) to an API prompt and print the tallies as JSON.

    .venv/bin/python tools/convert_templates_report.py [--registry | --catalogue object_info.json]
                                                       [--templates DIR] [--list]

The templates come from the `comfyui-workflow-templates-json` package unless --templates names a folder.
The catalogue is our node registry's /object_info (--registry), or a JSON file in that shape (default: the
hand-made core SD catalogue of the tests).
Each template is counted as converted (and valid when its wiring checks out against the catalogue),
refused because of node types the catalogue lacks, or failed for another reason (which is a bug to report).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from latentloom.engine.workflow import MissingNodeTypesError, WorkflowFormatError, ui_to_api  # noqa: E402
from latentloom.engine.workflow.check import prompt_problems  # noqa: E402

DEFAULT_CATALOGUE = Path(__file__).resolve().parent.parent / "tests" / "workflow_fixtures" / "catalogue.json"


def default_templates_dir() -> Path:
    try:
        import comfyui_workflow_templates_json as package
    except ImportError as error:
        raise SystemExit("install comfyui-workflow-templates-json or pass --templates DIR") from error
    return Path(package.__file__).resolve().parent / "templates"


def template_files(directory: Path) -> list[Path]:
    """The workflow files of a template folder (index, schema and search-option files are skipped)."""
    files = []
    for path in sorted(directory.glob("*.json")):
        if path.name.startswith("index") or path.name == "fuse_options.json":
            continue
        files.append(path)
    return files


def survey(files: list[Path], catalogue: dict) -> dict:
    counts = Counter()
    missing_types = Counter()
    outcome: dict[str, str] = {}
    for path in files:
        document = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(document, dict) or not isinstance(document.get("nodes"), list):
            continue
        counts["templates"] += 1
        try:
            prompt = ui_to_api(document, catalogue)
        except MissingNodeTypesError as error:
            counts["refused_missing_types"] += 1
            missing_types.update(error.missing)
            outcome[path.stem] = "missing: " + ", ".join(error.missing)
            continue
        except WorkflowFormatError as error:
            counts["failed_other"] += 1
            outcome[path.stem] = f"error: {error}"
            continue
        counts["converted"] += 1
        problems = prompt_problems(prompt, catalogue)
        if problems:
            outcome[path.stem] = "converted, invalid: " + "; ".join(problems[:3])
        else:
            counts["converted_valid"] += 1
            outcome[path.stem] = "converted, valid"
    return {
        "templates": counts["templates"],
        "converted": counts["converted"],
        "converted_valid": counts["converted_valid"],
        "refused_missing_types": counts["refused_missing_types"],
        "failed_other": counts["failed_other"],
        "distinct_missing_types": len(missing_types),
        "most_missing_types": dict(missing_types.most_common(25)),
        "outcomes": outcome,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--catalogue", type=Path, default=DEFAULT_CATALOGUE)
    parser.add_argument("--registry", action="store_true", help="use the built-in nodes' /object_info")
    parser.add_argument("--templates", type=Path, default=None)
    parser.add_argument("--list", action="store_true", help="include the outcome of every template")
    args = parser.parse_args()
    if args.registry:
        from latentloom.engine.registry import NodeRegistry
        from latentloom.nodes import builtin_nodes

        catalogue = NodeRegistry(builtin_nodes()).object_info()
    else:
        catalogue = json.loads(args.catalogue.read_text())
    report = survey(template_files(args.templates or default_templates_dir()), catalogue)
    if not args.list:
        report.pop("outcomes")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
