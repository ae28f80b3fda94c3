"""Prompt submission, queue, history, interrupt, free and the jobs API (frontend 1.58's queue/history panels)."""

from __future__ import annotations

import math
import uuid

from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.routing import Route

from .queue_store import DuplicatePromptId, QueueItem
from .state import PREVIEW_METHODS, ServerState, empty_ok, int_query, json_response, read_json, server_state

JOB_STATES = ("pending", "in_progress", "completed", "failed", "cancelled")
INLINE_VALIDATION_NODES = 300
HISTORY_STATES = frozenset({"completed", "failed", "cancelled"})


def bad_request(error_type: str, message: str, details: str = "", node_errors: dict | None = None, **extra):
    from latentloom.engine.validation import make_error  # (lazy: keeps networkx out of the server's start-up)

    return json_response({"error": make_error(error_type, message, details, **extra),
                          "node_errors": node_errors or {}}, 400)


def is_ui_workflow(document) -> bool:
    return isinstance(document, dict) and isinstance(document.get("nodes"), list) and "links" in document


class ConversionError(ValueError):
    def __init__(self, message: str, missing: list[str] | None = None):
        super().__init__(message)
        self.missing = missing or []


def convert_ui(state: ServerState, workflow: dict) -> dict:
    """UI (LiteGraph) format -> API prompt, server-side (ComfyUI's server cannot do this)."""
    from latentloom.engine.workflow import MissingNodeTypesError, WorkflowFormatError, ui_to_api

    try:
        return ui_to_api(workflow, state.engine.catalogue())
    except MissingNodeTypesError as exc:
        raise ConversionError(str(exc), exc.missing) from exc
    except WorkflowFormatError as exc:
        raise ConversionError(str(exc)) from exc


async def post_prompt(request: Request):
    state = server_state(request)
    body = await read_json(request)
    if not isinstance(body, dict):
        return bad_request("invalid_prompt", "The request body must be a JSON object", type(body).__name__)
    if body.get("number") is not None:
        try:
            number = float(body["number"])
        except (TypeError, ValueError, OverflowError):
            return bad_request("invalid_prompt", "'number' must be a number", repr(body["number"])[:200])
        if not math.isfinite(number):
            return bad_request("invalid_prompt", "'number' must be finite", repr(body["number"]))
    else:
        number = state.store.next_number(bool(body.get("front")))
    if "prompt" not in body:
        return bad_request("no_prompt", "No prompt provided", "No prompt provided")
    prompt = body["prompt"]
    ui_workflow = prompt if is_ui_workflow(prompt) else None
    if ui_workflow is not None:
        try:
            prompt = await run_in_threadpool(convert_ui, state, prompt)
        except ImportError:
            return bad_request("invalid_prompt", "UI-format workflows cannot be converted on this server", "")
        except ConversionError as exc:
            if exc.missing:
                return bad_request("missing_node_type", f"Node '{exc.missing[0]}' not found. The custom node may "
                                   "not be installed.", str(exc), class_type=exc.missing[0], node_id=None,
                                   node_title=None, missing=exc.missing)
            return bad_request("invalid_prompt", "Cannot convert the UI-format workflow", str(exc))
        except Exception as exc:  # a converter bug must still be a clear 400, not a 500
            return bad_request("invalid_prompt", "Cannot convert the UI-format workflow",
                               f"{type(exc).__name__}: {exc}")
    targets = body.get("partial_execution_targets")
    if targets is not None and (not isinstance(targets, list)
                                or not all(isinstance(t, (str, int)) and not isinstance(t, bool) for t in targets)):
        return bad_request("invalid_prompt", "partial_execution_targets must be a list of node ids", repr(targets))
    extra_data = body.get("extra_data") or {}
    if not isinstance(extra_data, dict):
        return bad_request("invalid_prompt", "extra_data must be an object", type(extra_data).__name__)
    method = extra_data.get("preview_method")
    if method is not None and method not in ("default", *PREVIEW_METHODS):
        return bad_request("invalid_prompt", "extra_data.preview_method must be one of: default, "
                           + ", ".join(PREVIEW_METHODS), repr(method)[:200])
    client_id = body.get("client_id")
    if client_id is not None and not isinstance(client_id, (str, int)):
        return bad_request("invalid_prompt", "client_id must be a string", type(client_id).__name__)
    prompt_id = body.get("prompt_id")
    if prompt_id is not None and (not isinstance(prompt_id, (str, int)) or isinstance(prompt_id, bool)
                                  or not str(prompt_id).strip() or len(str(prompt_id)) > 200):
        return bad_request("invalid_prompt", "prompt_id must be a non-empty string", repr(prompt_id)[:200])

    if isinstance(prompt, dict) and len(prompt) <= INLINE_VALIDATION_NODES:
        # Small graphs validate in well under a millisecond; a thread hop would cost more than that.
        checked = state.engine.validate(prompt, targets)
    else:
        checked = await run_in_threadpool(state.engine.validate, prompt, targets)
    if not checked.ok:
        return json_response(checked.as_response(), 400)
    extra_data = dict(extra_data)
    if ui_workflow is not None and not isinstance(extra_data.get("extra_pnginfo"), dict):
        # As the editor does: saved images carry the workflow they came from.
        extra_data["extra_pnginfo"] = {"workflow": ui_workflow}
    if client_id is not None:
        extra_data["client_id"] = str(client_id)
    item = QueueItem(number, str(prompt_id) if prompt_id is not None else str(uuid.uuid4()), prompt,
                     extra_data, list(checked.graph.outputs))
    try:
        state.store.put(item)
    except DuplicatePromptId as exc:
        return bad_request("invalid_prompt", "Duplicate prompt_id", str(exc))
    state.hub.broadcast_status()
    state.worker.wake()
    number_out = int(number) if float(number).is_integer() else number
    return json_response({"prompt_id": item.prompt_id, "number": number_out, "node_errors": checked.node_errors})


async def get_prompt(request: Request):
    return json_response({"exec_info": {"queue_remaining": server_state(request).store.remaining()}})


async def get_queue(request: Request):
    store = server_state(request).store
    return json_response({"queue_running": [i.as_tuple() for i in store.items("running")],
                          "queue_pending": [i.as_tuple() for i in store.items("pending")]})


def _id_list(value) -> list[str]:
    if not isinstance(value, list):
        raise HTTPException(400, "'delete' must be a list of prompt ids")
    return [str(v) for v in value]


async def post_queue(request: Request):
    state = server_state(request)
    body = await read_json(request)
    if not isinstance(body, dict):
        raise HTTPException(400, "JSON object expected")
    if body.get("clear"):
        state.store.clear_pending()
    if "delete" in body:
        state.store.delete_pending(_id_list(body["delete"]))
    state.hub.broadcast_status()
    return empty_ok()


async def post_interrupt(request: Request):
    state = server_state(request)
    body = await read_json(request, empty={})
    prompt_id = body.get("prompt_id") if isinstance(body, dict) else None
    state.worker.interrupt(str(prompt_id) if prompt_id is not None else None)
    return empty_ok()


async def post_free(request: Request):
    state = server_state(request)
    body = await read_json(request, empty={})
    if not isinstance(body, dict):
        raise HTTPException(400, "JSON object expected")
    state.worker.request_free(bool(body.get("unload_models")), bool(body.get("free_memory")))
    return empty_ok()


async def get_history(request: Request):
    store = server_state(request).store
    max_items = int_query(request, "max_items", None, minimum=0)
    offset = int_query(request, "offset", None)
    return json_response(store.history(max_items, offset))


async def get_history_entry(request: Request):
    prompt_id = request.path_params["prompt_id"]
    entry = server_state(request).store.history_entry(prompt_id)
    return json_response({prompt_id: entry} if entry is not None else {})


async def post_history(request: Request):
    store = server_state(request).store
    body = await read_json(request)
    if not isinstance(body, dict):
        raise HTTPException(400, "JSON object expected")
    if body.get("clear"):
        store.clear_history()
    if "delete" in body:
        store.delete_history(_id_list(body["delete"]))
    return empty_ok()


# Jobs API ---------------------------------------------------------------------------------------------------

def _ms(seconds: float | None) -> int | None:
    return int(seconds * 1000) if seconds else None


def _workflow_id(extra_data: dict) -> str | None:
    workflow = (extra_data.get("extra_pnginfo") or {}).get("workflow") if isinstance(extra_data, dict) else None
    value = workflow.get("id") if isinstance(workflow, dict) else None
    return str(value) if value is not None else None


def _previews(outputs: dict) -> list[dict]:
    found = []
    for node_id, ui in (outputs or {}).items():
        for media in ("images", "video", "gifs", "audio"):
            for item in (ui or {}).get(media, []) or []:
                if isinstance(item, dict) and "filename" in item:
                    found.append({**item, "nodeId": str(node_id), "mediaType": media})
    return found


def queue_job(item: QueueItem) -> dict:
    return {"id": item.prompt_id, "status": "in_progress" if item.state == "running" else "pending",
            "create_time": _ms(item.created), "execution_start_time": _ms(item.started),
            "execution_end_time": None, "preview_output": None, "outputs_count": None,
            "previewable_outputs_count": None, "execution_error": None,
            "workflow_id": _workflow_id(item.extra_data)}


def history_job(record: dict) -> dict:
    entry = record["entry"]
    outputs = entry.get("outputs") or {}
    previews = _previews(outputs)
    error = None
    for event, data in entry.get("status", {}).get("messages", []):
        if event == "execution_error":
            error = data
    extra = entry["prompt"][3] if len(entry.get("prompt", [])) > 3 else {}
    return {"id": record["prompt_id"], "status": record["status"], "create_time": _ms(record["created"]),
            "execution_start_time": _ms(record["started"]), "execution_end_time": _ms(record["finished"]),
            "preview_output": previews[-1] if previews else None,
            "outputs_count": sum(len(v) for ui in outputs.values() for v in (ui or {}).values()
                                 if isinstance(v, list)),
            "previewable_outputs_count": len(previews), "execution_error": error,
            "workflow_id": _workflow_id(extra)}


def _statuses(request: Request) -> set[str]:
    raw = request.query_params.get("status")
    if not raw:
        return set(JOB_STATES)
    wanted = {s.strip() for s in raw.split(",") if s.strip()}
    unknown = wanted - set(JOB_STATES)
    if unknown:
        raise HTTPException(400, f"unknown job status: {', '.join(sorted(unknown))}")
    return wanted


async def get_jobs(request: Request):
    store = server_state(request).store
    statuses = _statuses(request)
    limit = int_query(request, "limit", 100, minimum=0)
    limit = min(limit, 500)
    offset = int_query(request, "offset", 0, minimum=0)
    # Running first, then pending with the last to run first (the panel lists newest on top, like history).
    queued = [queue_job(i) for i in reversed(store.items())]
    queued.sort(key=lambda job: job["status"] != "in_progress")
    queued = [job for job in queued if job["status"] in statuses]
    jobs = queued[offset:offset + limit]
    history_statuses = statuses & HISTORY_STATES
    history_offset = max(0, offset - len(queued))
    rows, history_total = ([], 0)
    if history_statuses:
        rows, history_total = store.history_rows(history_statuses, max(0, limit - len(jobs)), history_offset)
    jobs.extend(history_job(r) for r in rows)
    total = len(queued) + history_total
    return json_response({"jobs": jobs, "pagination": {"offset": offset, "limit": limit, "total": total,
                                                       "has_more": offset + len(jobs) < total}})


async def get_job(request: Request):
    store = server_state(request).store
    job_id = request.path_params["job_id"]
    item = store.queued(job_id)
    if item is not None:
        job = queue_job(item)
        job["workflow"] = {"prompt": item.prompt, "extra_data": item.extra_data}
        return json_response(job)
    record = store.history_record(job_id)
    if record is None:
        return json_response({"error": f"job '{job_id}' not found"}, 404)
    entry = record["entry"]
    job = history_job(record)
    prompt = entry.get("prompt", [None, None, {}, {}, []])
    job.update({"workflow": {"prompt": prompt[2], "extra_data": prompt[3]}, "outputs": entry.get("outputs", {}),
                "update_time": job["execution_end_time"], "execution_status": entry.get("status"),
                "execution_meta": entry.get("meta", {})})
    return json_response(job)


def cancel_jobs(state: ServerState, job_ids: list[str]) -> list[str]:
    cancelled = []
    for job_id in job_ids:
        if state.store.delete_pending([job_id]) or state.worker.interrupt(job_id):
            cancelled.append(job_id)
    state.hub.broadcast_status()
    return cancelled


async def post_job_cancel(request: Request):
    state = server_state(request)
    job_id = request.path_params["job_id"]
    cancelled = cancel_jobs(state, [job_id])
    if not cancelled and state.store.history_record(job_id) is None:
        return json_response({"error": f"no job '{job_id}'"}, 404)
    # Cancelling a finished job is a no-op, as the frontend expects.
    return json_response({"cancelled": cancelled})


async def post_jobs_cancel(request: Request):
    state = server_state(request)
    body = await read_json(request)
    ids = body.get("job_ids") if isinstance(body, dict) else None
    if not isinstance(ids, list):
        raise HTTPException(400, "'job_ids' must be a list")
    return json_response({"cancelled": cancel_jobs(state, [str(i) for i in ids])})


ROUTES = [
    Route("/prompt", post_prompt, methods=["POST"]),
    Route("/prompt", get_prompt, methods=["GET"]),
    Route("/queue", get_queue, methods=["GET"]),
    Route("/queue", post_queue, methods=["POST"]),
    Route("/interrupt", post_interrupt, methods=["POST"]),
    Route("/free", post_free, methods=["POST"]),
    Route("/history", get_history, methods=["GET"]),
    Route("/history", post_history, methods=["POST"]),
    Route("/history/{prompt_id:path}", get_history_entry, methods=["GET"]),
    Route("/jobs", get_jobs, methods=["GET"]),
    Route("/jobs/cancel", post_jobs_cancel, methods=["POST"]),
    Route("/jobs/{job_id}", get_job, methods=["GET"]),
    Route("/jobs/{job_id}/cancel", post_job_cancel, methods=["POST"]),
]
