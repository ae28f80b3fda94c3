"""The `latentloom` command: run, validate, convert, nodes, serve.

Exit codes: 0 ok, 2 invalid input (unreadable file, invalid graph, bad override), 1 runtime error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_RUNTIME, EXIT_INVALID = 0, 1, 2
DEFAULT_GRAPH = "txt2img.json"


def _engine_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models-dir", help="model root in ComfyUI's layout (default: the bundled models/)")
    parser.add_argument("--extra-model-paths", help="a ComfyUI extra_model_paths.yaml")
    parser.add_argument("--input-dir", default="input")
    parser.add_argument("--output-dir", default="output")
    parser.add_argument("--temp-dir", default="temp")
    parser.add_argument("--custom-nodes", default="custom_nodes",
                        help="folder of custom node packs, ComfyUI's (V1) or ours (default: ./custom_nodes)")
    parser.add_argument("--vram-budget", type=_byte_size, metavar="BYTES",
                        help="bytes of model weights kept on the GPU, e.g. 6GB, 5.5GiB or 6000000000 (default: 90%% "
                             "of the GPU's memory); models that do not fit are streamed, see --stream-weights")
    parser.add_argument("--stream-weights", action=argparse.BooleanOptionalAction, default=True,
                        help="place a model larger than the VRAM budget partly and stream its other layers' weights "
                             "from RAM per call (default); --no-stream-weights loads it whole, over budget")


def _byte_size(value: str) -> int:
    from latentloom.engine.memory import parse_bytes

    try:
        return parse_bytes(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="latentloom", description="Node-graph diffusion workflows.")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run a workflow file (API JSON, UI JSON or PNG) headless")
    run.add_argument("file", nargs="?", default=DEFAULT_GRAPH,
                     help=f"the workflow; a name of a bundled graph also works (default: {DEFAULT_GRAPH})")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="NODE_ID.INPUT=VALUE",
                     help="override an input (repeatable); VALUE is JSON or a plain string")
    run.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--verbose", action="store_true", help="show tracebacks of runtime errors")
    _engine_args(run)

    validate = commands.add_parser("validate", help="validate a workflow file without running it")
    validate.add_argument("file")
    validate.add_argument("--json", action="store_true")
    _engine_args(validate)

    convert = commands.add_parser("convert", help="convert a workflow between UI and API format")
    convert.add_argument("file")
    convert.add_argument("--to", choices=("api", "ui"), required=True)
    convert.add_argument("-o", "--output", help="output file (default: stdout)")
    _engine_args(convert)

    nodes = commands.add_parser("nodes", help="list the node catalogue")
    nodes.add_argument("--json", action="store_true", help="the catalogue in ComfyUI's /object_info shape")
    _engine_args(nodes)

    serve = commands.add_parser("serve", help="run the HTTP/websocket server with the graph editor")
    serve.add_argument("--listen", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8188)
    serve.add_argument("--user-dir", default="user")
    serve.add_argument("--database", help="SQLite file for the queue and history (default: USER_DIR/queue.db)")
    serve.add_argument("--cache-bytes", type=int, help="output cache budget in bytes (default 2 GiB)")
    serve.add_argument("--cache-prompts", type=_positive_int, help="drop cached outputs that none of the last N "
                       "prompts needed (default 8; ComfyUI keeps the last prompt's)")
    serve.add_argument("--auth-token", help="require 'Authorization: Bearer TOKEN' (set one off loopback)")
    serve.add_argument("--workers", choices=("local", "ray"), default="local",
                       help="'ray': run prompts on a pool of Ray actors (one per GPU) fed by this server's queue")
    serve.add_argument("--ray-address", help="with --workers ray: an existing Ray cluster ('auto', "
                       "'ray://HOST:10001'); default: start a local one")
    serve.add_argument("--num-workers", type=int, help="with --workers ray: number of worker actors "
                       "(default: one per GPU, or 1 without GPUs)")
    serve.add_argument("--allowed-hosts", help="extra Host names accepted, comma-separated (DNS-rebinding guard)")
    serve.add_argument("--max-upload-size", type=float, help="upload limit in MB (default 100)")
    serve.add_argument("--preview-method", choices=("none", "auto", "latent2rgb", "taesd"), default="none",
                       help="live previews while sampling, as ComfyUI's option (default: none; the editor's "
                       "'Live preview method' setting asks per prompt). taesd falls back to latent2rgb")
    _engine_args(serve)
    return parser


def make_engine(args: argparse.Namespace, cache_bytes: int | None = None):
    from latentloom.nodes import create_engine

    custom = args.custom_nodes if args.custom_nodes and Path(args.custom_nodes).is_dir() else None
    return create_engine(models_dir=args.models_dir, input_dir=args.input_dir, output_dir=args.output_dir,
                         temp_dir=args.temp_dir, extra_model_paths=args.extra_model_paths,
                         custom_nodes_dir=custom, cache_bytes=cache_bytes,
                         cache_prompts=getattr(args, "cache_prompts", None), vram_budget=args.vram_budget,
                         stream_weights=args.stream_weights)


def report_load_errors(engine, args: argparse.Namespace) -> None:
    """Custom node packs that failed to load, one warning each on stderr (the run goes on without them)."""
    if getattr(args, "json", False):
        return
    for source, reason in engine.registry.load_errors.items():
        print(f"warning: custom nodes {source} failed to load: {reason}", file=sys.stderr)


def format_node_errors(result, prompt: dict | None = None) -> str:
    lines = []
    if result.error:
        error = result.error
        lines.append(f"error: {error['message']}" + (f" ({error['details']})" if error.get("details") else ""))
    for node_id, entry in result.node_errors.items():
        title = ""
        if prompt and isinstance(prompt.get(node_id), dict):
            title = (prompt[node_id].get("_meta") or {}).get("title") or ""
        label = f"node #{node_id} {entry['class_type']}" + (f" '{title}'" if title and title != entry["class_type"]
                                                             else "")
        for error in entry["errors"]:
            detail = f": {error['details']}" if error.get("details") else ""
            lines.append(f"  {label}: {error['message']}{detail}")
    return "\n".join(lines)


def load_prompt(engine, path: str) -> tuple[dict, dict | None, str]:
    """(API prompt, UI workflow or None, detected format); WorkflowLoadError for anything unreadable."""
    from latentloom.engine.api import WorkflowLoadError

    resolved = resolve_workflow_path(path)
    try:
        return engine.load_with_format(resolved)
    except OSError as exc:
        raise WorkflowLoadError(f"{path}: cannot read the file: {exc.strerror or exc}") from exc


def resolve_workflow_path(path: str) -> Path:
    """A workflow file by path, else a bundled graph by name (`txt2img`, `txt2img.json`), so an installed wheel
    runs its own graphs from any folder."""
    from latentloom.engine.api import WorkflowLoadError
    from latentloom.nodes import bundled_graphs_dir

    given = Path(path)
    if given.is_file():
        return given
    if given.name == path:
        for candidate in (bundled_graphs_dir() / path, bundled_graphs_dir() / f"{path}.json"):
            if candidate.is_file():
                return candidate
    raise WorkflowLoadError(f"{path}: no such file")


class ProgressPrinter:
    """tqdm bars on stderr: one for the nodes of the run, one for the steps of the running node."""

    def __init__(self, total_nodes: int, enabled: bool):
        from tqdm import tqdm

        self.tqdm = tqdm
        self.enabled = enabled
        self.nodes = tqdm(total=total_nodes, desc="nodes", unit="node", file=sys.stderr, disable=not enabled,
                          leave=False)
        self.steps: Any = None

    def __call__(self, event) -> None:
        kind = event.type
        if kind == "executing" and event.node is not None:
            self.nodes.set_postfix_str(f"#{event.node}")
        elif kind == "progress":
            if self.steps is None or self.steps.total != event.max:
                self._close_steps()
                self.steps = self.tqdm(total=event.max, desc=f"  #{event.node}", unit="step", file=sys.stderr,
                                       disable=not self.enabled, leave=False)
            self.steps.n = event.value
            self.steps.refresh()
        elif kind == "progress_state":
            finished = sum(1 for state in event.nodes.values() if state.state == "finished")
            if finished > self.nodes.n:
                self.nodes.update(finished - self.nodes.n)

    def _close_steps(self) -> None:
        if self.steps is not None:
            self.steps.close()
            self.steps = None

    def close(self) -> None:
        self._close_steps()
        self.nodes.close()


def output_files(engine, outputs: dict[str, dict]) -> list[str]:
    roots = {"output": engine.env.output_dir, "temp": engine.env.temp_dir, "input": engine.env.input_dir}
    files = []
    for ui in outputs.values():
        for image in ui.get("images", []) if isinstance(ui, dict) else []:
            if isinstance(image, dict) and "filename" in image:
                root = roots.get(image.get("type", "output"), engine.env.output_dir)
                files.append(str(Path(root) / image.get("subfolder", "") / image["filename"]))
    return files


def command_run(args: argparse.Namespace) -> int:
    from latentloom.engine.api import OverrideError, WorkflowLoadError, parse_literal, set_input

    from .credentials import split_secrets

    engine = make_engine(args)
    report_load_errors(engine, args)
    try:
        prompt, workflow, detected = load_prompt(engine, args.file)
        for override in args.overrides:
            target, sep, value = override.partition("=")
            if not sep:
                raise OverrideError(f"override '{override}' must look like NODE_ID.INPUT=VALUE")
            prompt = set_input(prompt, target, parse_literal(value, target))
    except (WorkflowLoadError, OverrideError) as exc:
        return _fail_invalid(args, str(exc))
    checked = engine.validate(prompt)
    if not checked.ok:
        if args.json:
            print(json.dumps({"status": "invalid", "format": detected, **checked.as_response()}, default=str))
        else:
            print(format_node_errors(checked, prompt), file=sys.stderr)
        return EXIT_INVALID
    if checked.node_errors and not args.json:
        print("some outputs are invalid and will not run:\n" + format_node_errors(checked, prompt), file=sys.stderr)
    # A workflow file may carry credentials; none of them goes into the saved images' metadata.
    extra_data = split_secrets({"extra_pnginfo": {"workflow": workflow}})[0] if workflow else {}
    printer = ProgressPrinter(len(checked.graph.nodes), enabled=not args.no_progress and not args.json)
    unsubscribe = engine.bus.subscribe(printer)
    try:
        result = engine.executor.run(checked.graph, extra_data=extra_data)
    finally:
        unsubscribe()
        printer.close()
    files = output_files(engine, result.outputs)
    texts = [t for ui in result.outputs.values() for t in (ui.get("text", []) if isinstance(ui, dict) else [])]
    summary: dict[str, Any] = {
        "status": result.status, "prompt_id": result.prompt_id, "format": detected, "outputs": files,
        "text": texts, "executed": len(result.executed), "cached": len(result.cached),
        "seconds": round(result.seconds, 3), "warnings": result.warnings,
        "cache": engine.cache.stats().as_dict(),
    }
    if engine.registry.load_errors:
        summary["custom_node_errors"] = dict(engine.registry.load_errors)
    stats = engine.env.models.stats()  # a dataclass: as a JSON object, not its repr string
    summary["memory"] = stats.as_dict() if hasattr(stats, "as_dict") else stats
    if result.error:
        summary["error"] = {k: result.error.get(k) for k in
                            ("node_id", "node_type", "exception_type", "exception_message") if k in result.error}
    if args.json:
        print(json.dumps(summary, default=str))
    else:
        for path in files:
            print(path)
        for text in texts:
            print(text)
        for warning in result.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        if result.status == "error":
            error = result.error
            print(f"error in node #{error['node_id']} {error['node_type']}: {error['exception_type']}: "
                  f"{error['exception_message']}", file=sys.stderr)
            if args.verbose:
                print("".join(error["traceback"]), file=sys.stderr)
        elif result.status == "interrupted":
            print("interrupted", file=sys.stderr)
    return EXIT_OK if result.ok else EXIT_RUNTIME


def _fail_invalid(args: argparse.Namespace, message: str) -> int:
    if getattr(args, "json", False):
        print(json.dumps({"status": "invalid", "error": {"type": "invalid_workflow", "message": message}}))
    else:
        print(f"error: {message}", file=sys.stderr)
    return EXIT_INVALID


def command_validate(args: argparse.Namespace) -> int:
    from latentloom.engine.api import WorkflowLoadError

    engine = make_engine(args)
    try:
        prompt, _, detected = load_prompt(engine, args.file)
    except WorkflowLoadError as exc:
        return _fail_invalid(args, str(exc))
    report_load_errors(engine, args)
    checked = engine.validate(prompt)
    if args.json:
        body = {"valid": checked.ok, "format": detected, "outputs": checked.graph.outputs if checked.ok else [],
                **checked.as_response()}
        print(json.dumps(body, default=str))
    elif checked.ok:
        print(f"valid ({detected} format, {len(prompt)} nodes, outputs: {', '.join(checked.graph.outputs)})")
        if checked.node_errors:
            print(format_node_errors(checked, prompt), file=sys.stderr)
    else:
        print(format_node_errors(checked, prompt), file=sys.stderr)
    return EXIT_OK if checked.ok else EXIT_INVALID


def command_convert(args: argparse.Namespace) -> int:
    from latentloom.engine.api import WorkflowLoadError

    engine = make_engine(args)
    try:
        prompt, workflow, detected = load_prompt(engine, args.file)
        if args.to == "api":
            document = prompt
        else:
            from latentloom.engine.workflow import api_to_ui

            document = workflow if workflow is not None else api_to_ui(prompt,
                                                                                              engine.catalogue())
    except WorkflowLoadError as exc:
        return _fail_invalid(args, str(exc))
    text = json.dumps(document, indent=2)
    if args.output:
        Path(args.output).write_text(text + "\n")
        print(f"{args.file} ({detected}) -> {args.output} ({args.to})", file=sys.stderr)
    else:
        print(text)
    return EXIT_OK


def command_nodes(args: argparse.Namespace) -> int:
    engine = make_engine(args)
    catalogue = engine.catalogue()
    if args.json:
        print(json.dumps(catalogue))
    else:
        for name, info in sorted(catalogue.items(), key=lambda kv: (kv[1]["category"], kv[0])):
            print(f"{info['category']:<28} {name:<32} -> {', '.join(info['output']) or '(output node)'}")
        for source, reason in engine.registry.load_errors.items():
            print(f"failed to load {source}: {reason}", file=sys.stderr)
    return EXIT_OK


def command_serve(args: argparse.Namespace) -> int:
    from latentloom.server.app import serve

    return serve(args) or EXIT_OK


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    handler = {"run": command_run, "validate": command_validate, "convert": command_convert,
               "nodes": command_nodes, "serve": command_serve}[args.command]
    try:
        return handler(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_RUNTIME


if __name__ == "__main__":
    sys.exit(main())
