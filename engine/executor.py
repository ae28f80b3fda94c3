"""The DAG executor.

One continuation model covers lazy inputs, node expansion and async nodes: a node that cannot finish yet returns
the set of node ids it now waits on; the scheduler counts them like any other dependency and re-enters the node
when they are done. Scheduling is an in-degree queue (linear in the graph), nothing recurses over the graph, and
all state lives in one `_Run` per execution, so two executors (or two runs) in one process never interfere.
"""

from __future__ import annotations

import asyncio
import inspect
import time
import traceback
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import networkx as nx

from .cache import DEFAULT_CACHE_BYTES, OutputCache, Uncacheable, node_key
from .environment import Environment
from .events import (
    Event,
    EventBus,
    Executed,
    Executing,
    ExecutionCached,
    ExecutionError,
    ExecutionInterrupted,
    ExecutionStart,
    ExecutionSuccess,
    NodeProgressState,
    NodeState,
    NodeWarning,
    Progress,
    ProgressState,
)
from .inputs import InputError, node_label
from .node import ExecutionBlocker, NodeOutput
from .registry import NodeRegistry
from .run_state import (
    Interrupted,
    InterruptToken,
    RunResult,
    UiData,
    exception_type_name,
    format_input_value,
)
from .validation import (
    Graph,
    GraphNode,
    InputChecker,
    Link,
    build_node,
    check_links,
    dependency_graph,
    find_cycles,
    parse_link,
    upstream_of,
)

if TYPE_CHECKING:
    from .memory import ModelManager

ServiceT = TypeVar("ServiceT")

# What executing a node gives: its outputs and UI data, or the node ids it must wait on before it is re-entered.
Done = tuple[Literal["done"], tuple[list[list[Any]], UiData | None]]
Wait = tuple[Literal["wait"], list[str]]
Outcome = Done | Wait

# Full progress_state maps are sent for runs up to this many nodes; bigger runs get per-node deltas, which keeps
# the event volume linear.
FULL_PROGRESS_STATE_LIMIT = 200


class DependencyCycleError(Exception):
    pass


class NodeFailure(Exception):
    def __init__(self, node: GraphNode, exc: BaseException, inputs: dict[str, Any]):
        super().__init__(str(exc))
        self.node = node
        self.exc = exc
        self.inputs = inputs


class NodeContext:
    """What a running node sees (engine.node.RunContext)."""

    def __init__(self, run: _Run, node: GraphNode):
        self._run = run
        self.node_id = node.id
        self.display_node_id = node.display
        self.class_type = node.class_type
        self.parent_node_id = node.parent
        self.prompt_id = run.prompt_id
        self.prompt = run.graph.prompt
        self.extra_data = run.extra_data
        self.env: Environment = run.executor.env

    @property
    def models(self) -> ModelManager:
        return self.env.models

    def service(self, kind: type[ServiceT]) -> ServiceT:
        return self.env.service(kind)

    def find_service(self, kind: type[ServiceT]) -> ServiceT | None:
        return self.env.find_service(kind)

    def check_interrupt(self) -> None:
        self._run.interrupt.check()

    def progress(self, value: int, maximum: int, preview: tuple[str, bytes] | None = None) -> None:
        self._run.interrupt.check()
        self._run.emit_progress(self, value, maximum, preview)

    def warn(self, message: str) -> None:
        self._run.warnings.append(f"{node_label(self.class_type, self.display_node_id)}: {message}")
        self._run.emit(lambda: NodeWarning(prompt_id=self.prompt_id, node=self.display_node_id, message=message))


class Executor:
    def __init__(self, registry: NodeRegistry, env: Environment | None = None, cache: OutputCache | None = None,
                 bus: EventBus | None = None):
        self.registry = registry
        self.env = env if env is not None else Environment()
        self.cache = cache if cache is not None else OutputCache(DEFAULT_CACHE_BYTES)
        self.bus = bus if bus is not None else EventBus()

    def run(self, graph: Graph, prompt_id: str | None = None, extra_data: dict[str, Any] | None = None,
            interrupt: InterruptToken | None = None) -> RunResult:
        """Run synchronously (a fresh event loop). Inside a running loop, await run_async instead."""
        return asyncio.run(self.run_async(graph, prompt_id, extra_data, interrupt))

    async def run_async(self, graph: Graph, prompt_id: str | None = None, extra_data: dict[str, Any] | None = None,
                        interrupt: InterruptToken | None = None) -> RunResult:
        run = _Run(self, graph, prompt_id or str(uuid.uuid4()), extra_data or {}, interrupt or InterruptToken())
        return await run.execute()


class _Run:
    def __init__(self, executor: Executor, graph: Graph, prompt_id: str, extra_data: dict[str, Any],
                 interrupt: InterruptToken):
        self.executor = executor
        self.cache = executor.cache
        self.graph = graph
        self.nodes: dict[str, GraphNode] = dict(graph.nodes)
        self.prompt_id = prompt_id
        self.extra_data = extra_data
        self.interrupt = interrupt
        self.keys: dict[str, str] = {}
        self.cacheable: dict[str, bool] = {}
        self.values: dict[str, list[list[Any]]] = {}   # outputs available to this run, by node id
        self.ui: dict[str, UiData] = {}
        self.output_set = set(graph.outputs)
        self.holds: dict[str, set[str]] = {}           # node -> producers whose values it may still read
        self.claims: dict[str, int] = {}                # producer -> nodes holding it
        self.blockers: dict[str, int] = {}              # pending node -> unfinished producers it waits on
        self.waiters: dict[str, list[str]] = {}         # producer -> pending nodes waiting on it
        self.ready: deque[str] = deque()
        self.running: dict[asyncio.Task[Outcome], str] = {}
        # node -> (per-call results with links, ui)
        self.expansions: dict[str, tuple[list[tuple[Any, ...]], UiData | None]] = {}
        self.executed: list[str] = []
        self.cached: list[str] = []            # nodes served from the cache in this run
        self.cached_at_start: list[str] = []
        self.warnings: list[str] = []
        self.states: dict[str, NodeProgressState] = {}
        self.current_node: GraphNode | None = None      # the last node started (named by interrupts)
        self.listening = executor.bus.has_listeners
        self.checker = InputChecker(executor.env)

    # Events ---------------------------------------------------------------------------------------------------

    def emit(self, make_event: Event | Callable[[], Event]) -> None:
        if self.listening:
            self.executor.bus.emit(make_event() if callable(make_event) else make_event)

    def set_state(self, node: GraphNode, state: NodeState, value: float = 0, maximum: float = 1) -> None:
        if not self.listening:
            return
        self.states[node.id] = NodeProgressState(
            value=value, max=maximum, state=state, node_id=node.id, prompt_id=self.prompt_id,
            display_node_id=node.display, parent_node_id=node.parent, real_node_id=node.id)
        nodes = self.states if len(self.nodes) <= FULL_PROGRESS_STATE_LIMIT else {node.id: self.states[node.id]}
        self.emit(ProgressState(prompt_id=self.prompt_id, nodes=dict(nodes)))

    def emit_progress(self, ctx: NodeContext, value: int, maximum: int, preview: tuple[str, bytes] | None) -> None:
        node = self.nodes[ctx.node_id]
        self.set_state(node, "running", value, maximum)
        self.emit(lambda: Progress(prompt_id=self.prompt_id, value=value, max=maximum, node=node.display,
                                   preview=preview[1] if preview else None,
                                   preview_type=preview[0] if preview else None,
                                   parent_node=node.parent, real_node=node.id))

    # Keys -----------------------------------------------------------------------------------------------------

    def compute_keys(self, node_ids: list[str]) -> None:
        """Keys for the given nodes, which must be in topological order (producers first)."""
        env = self.executor.env
        for node_id in node_ids:
            if node_id in self.keys:
                continue
            node = self.nodes[node_id]
            cls = node.node_cls
            linked = [(name, self.keys[link.source], link.slot) for name, link in node.links.items()]
            salt = None
            cacheable = cls.deterministic
            if not cacheable:
                salt = f"{self.prompt_id}/{node_id}"
            fingerprint = None
            try:
                fingerprint = cls.fingerprint(env, dict(node.constants))
                key = node_key(node.class_type, cls.version, node.constants, fingerprint, linked, salt)
            except Uncacheable:
                cacheable = False
                key = node_key(node.class_type, cls.version, {}, None, linked, f"{self.prompt_id}/{node_id}")
            self.keys[node_id] = key
            self.cacheable[node_id] = cacheable and all(self.cacheable[link.source] for link in node.links.values())

    # Scheduling -----------------------------------------------------------------------------------------------

    def schedule(self, targets: list[str]) -> None:
        """Make each target available: from this run's values, the cache, or by scheduling it (and what it needs)."""
        stack = list(targets)
        while stack:
            node_id = stack.pop()
            if node_id in self.values or node_id in self.blockers:
                continue
            entry = self.cache.get(self.keys[node_id]) if self.cacheable[node_id] else None
            if entry is not None:
                self.values[node_id] = entry.outputs
                self.cached.append(node_id)
                if entry.ui is not None:
                    self.ui[node_id] = entry.ui
                self.release_waiters(node_id)
                continue
            node = self.nodes[node_id]
            self.claim(node_id, [link.source for link in node.links.values() if link.source in self.nodes])
            missing = [link.source for _, link in node.dependency_links() if link.source not in self.values]
            self.blockers[node_id] = 0
            for source in dict.fromkeys(missing):
                self.blockers[node_id] += 1
                self.waiters.setdefault(source, []).append(node_id)
                stack.append(source)
            if self.blockers[node_id] == 0:
                self.ready.append(node_id)

    def wait_for(self, node_id: str, sources: list[str]) -> None:
        """Park a node until `sources` are available (lazy inputs, expansion results)."""
        self.claim(node_id, sources)
        pending = [s for s in dict.fromkeys(sources) if s not in self.values]
        self.schedule(pending)
        pending = [s for s in pending if s not in self.values]
        self.blockers[node_id] = len(pending)
        for source in pending:
            self.waiters.setdefault(source, []).append(node_id)
        if not pending:
            self.ready.append(node_id)

    def finish(self, node_id: str, outputs: list[list[Any]], ui: UiData | None) -> None:
        node = self.nodes[node_id]
        self.values[node_id] = outputs
        if ui:
            self.ui[node_id] = ui
        if self.cacheable[node_id]:
            self.cache.put(self.keys[node_id], outputs, ui)
        del self.blockers[node_id]
        self.release_waiters(node_id)
        self.release_claims(node_id)
        self.set_state(node, "finished", 1, 1)

    # Run-local values are kept only while a pending node may still read them. A dropped value needed again later
    # (a lazy request) comes back from the output cache or is recomputed, so only deterministic values are dropped.
    def claim(self, node_id: str, sources: list[str]) -> None:
        held = self.holds.setdefault(node_id, set())
        for source in sources:
            if source not in held:
                held.add(source)
                self.claims[source] = self.claims.get(source, 0) + 1

    def release_claims(self, node_id: str) -> None:
        for source in self.holds.pop(node_id, ()):
            self.claims[source] -= 1
            if self.claims[source] == 0 and source in self.values and source not in self.output_set \
                    and self.cacheable[source]:
                del self.values[source]

    def release_waiters(self, node_id: str) -> None:
        for waiter in self.waiters.pop(node_id, []):
            self.blockers[waiter] -= 1
            if self.blockers[waiter] == 0:
                self.ready.append(waiter)

    # Main loop ------------------------------------------------------------------------------------------------

    async def execute(self) -> RunResult:
        started = time.perf_counter()
        result = RunResult(self.prompt_id, "success")
        self.emit(lambda: ExecutionStart(prompt_id=self.prompt_id))
        try:
            self.interrupt.check()
            order = self.topological_order(self.graph.outputs)
            self.compute_keys(order)
            # Every needed node whose output is cached, as ComfyUI reports it (not only those the run reads).
            cached_keys = set(self.cache.begin_prompt([self.keys[n] for n in order if self.cacheable[n]]))
            self.cached_at_start = [n for n in order if self.cacheable[n] and self.keys[n] in cached_keys]
            self.schedule(list(self.graph.outputs))
            self.emit(lambda: ExecutionCached(prompt_id=self.prompt_id, nodes=list(self.cached_at_start)))
            for node_id in self.cached:
                if self.nodes[node_id].node_cls.output_node:
                    node = self.nodes[node_id]
                    self.emit(Executed(prompt_id=self.prompt_id, node=node.id, display_node=node.display,
                                       output=self.ui.get(node.id)))
            await self.loop()
            self.emit(lambda: ExecutionSuccess(prompt_id=self.prompt_id))
        except Interrupted:
            await self.cancel_running()
            result.status = "interrupted"
            current = self.current_node
            interrupted = ExecutionInterrupted(
                prompt_id=self.prompt_id, node_id=current.display if current else None,
                node_type=current.class_type if current else None, executed=list(self.executed)).data()
            result.error = interrupted
            self.emit(lambda: ExecutionInterrupted(prompt_id=self.prompt_id, **{
                k: v for k, v in interrupted.items() if k not in ("prompt_id", "timestamp")}))
        except NodeFailure as failure:
            await self.cancel_running()
            result.status = "error"
            event = ExecutionError(
                prompt_id=self.prompt_id, node_id=failure.node.display, node_type=failure.node.class_type,
                executed=list(self.executed), exception_message=str(failure.exc) or type(failure.exc).__name__,
                exception_type=exception_type_name(failure.exc),
                traceback=traceback.format_exception(failure.exc),
                current_inputs={k: [format_input_value(v) for v in vs] for k, vs in failure.inputs.items()},
                current_outputs=list(self.cached_at_start))
            result.error = event.data()
            self.emit(event)
        result.outputs = {self.nodes[n].display: ui for n, ui in self.ui.items()
                          if self.nodes[n].node_cls.output_node}
        result.values = {n: self.values[n] for n in self.graph.outputs if n in self.values}
        result.executed = self.executed
        result.cached = self.cached_at_start
        result.warnings = self.warnings
        result.seconds = time.perf_counter() - started
        return result

    def topological_order(self, targets: list[str]) -> list[str]:
        """Producers-first order of every node the targets may read (lazy and raw links included)."""
        dag = dependency_graph(self.nodes)
        needed = upstream_of(dag, targets)
        if len(needed) < len(self.nodes):
            dag = dependency_graph(self.nodes, needed)
        return list(nx.topological_sort(dag))

    async def loop(self) -> None:
        while self.ready or self.running:
            while self.ready:
                self.interrupt.check()
                node_id = self.ready.popleft()
                node = self.nodes[node_id]
                if node.node_cls.is_async():
                    task = asyncio.ensure_future(self.execute_node(node))
                    self.running[task] = node_id
                else:
                    self.handle(node_id, await self.execute_node(node))
            if self.running:
                # Poll so that an interrupt reaches async nodes that never report progress.
                done, _ = await asyncio.wait(list(self.running), timeout=0.05, return_when=asyncio.FIRST_COMPLETED)
                self.interrupt.check()
                for task in done:
                    node_id = self.running.pop(task)
                    self.handle(node_id, task.result())
        stuck = [n for n in self.blockers]
        if stuck:
            node = self.nodes[stuck[0]]
            culprit = self.nodes.get(node.parent) if node.parent else node
            raise NodeFailure(culprit or node, DependencyCycleError(
                f"nodes waiting on each other: {', '.join(stuck[:10])}"), {})

    def handle(self, node_id: str, outcome: Outcome) -> None:
        if outcome[0] == "done":
            self.finish(node_id, *outcome[1])
        else:
            self.wait_for(node_id, outcome[1])

    async def cancel_running(self) -> None:
        for task in self.running:
            task.cancel()
        if self.running:
            await asyncio.gather(*self.running, return_exceptions=True)
        self.running.clear()

    # One node -------------------------------------------------------------------------------------------------

    def gather_inputs(self, node: GraphNode) -> tuple[dict[str, list[Any]], list[str]]:
        """Input lists for the node, and the lazy inputs still unevaluated."""
        specs = node.node_cls.input_specs()
        inputs: dict[str, list[Any]] = {name: [value] for name, value in node.constants.items()}
        unevaluated = []
        for name, link in node.links.items():
            spec = specs.get(name)
            if spec is not None and spec.raw_link:
                inputs[name] = [link.as_json()]
            elif link.source in self.values:
                inputs[name] = self.values[link.source][link.slot]
            else:
                unevaluated.append(name)
        return inputs, unevaluated

    async def execute_node(self, node: GraphNode) -> Outcome:
        inputs: dict[str, list[Any]] = {}
        try:
            if node.id in self.expansions:
                return "done", self.collect_expansion(node)
            inputs, unevaluated = self.gather_inputs(node)
            ctx = NodeContext(self, node)
            if unevaluated:
                wanted = await self.lazy_requests(node, ctx, inputs, unevaluated)
                if wanted:
                    return "wait", [node.links[name].source for name in wanted]
            self.current_node = node
            self.set_state(node, "running", 0, 1)
            self.emit(lambda: Executing(prompt_id=self.prompt_id, node=node.display, display_node=node.display))
            results = await self.call_mapped(node, ctx, inputs)
            self.executed.append(node.id)
            return self.merge_or_expand(node, results)
        except (Interrupted, NodeFailure):
            raise
        except InputError as exc:
            raise NodeFailure(node, exc.for_node(node_label(node.class_type, node.display)), inputs) from exc
        except Exception as exc:
            raise NodeFailure(node, exc, inputs) from exc

    def call_count(self, node: GraphNode, inputs: dict[str, list[Any]]) -> int:
        if node.node_cls.input_is_list or not inputs:
            return 1
        return max(len(values) for values in inputs.values())

    def call_inputs(self, node: GraphNode, inputs: dict[str, list[Any]], index: int) -> dict[str, Any]:
        if node.node_cls.input_is_list:
            return dict(inputs)
        # A shorter list repeats its last element (ComfyUI's list mapping).
        return {name: values[min(index, len(values) - 1)] if values else None for name, values in inputs.items()}

    async def lazy_requests(self, node: GraphNode, ctx: NodeContext, inputs: dict[str, list[Any]],
                            unevaluated: list[str]) -> list[str]:
        wanted: set[str] = set()
        available = set(inputs)
        for index in range(self.call_count(node, inputs)):
            kwargs = self.call_inputs(node, inputs, index)
            for name in unevaluated:
                kwargs[name] = [None] if node.node_cls.input_is_list else None
            instance = node.node_cls.model_construct(**kwargs)
            names = instance.inputs_needed(ctx, available)
            if inspect.isawaitable(names):
                names = await names
            wanted.update(names)
        return [name for name in unevaluated if name in wanted]

    def socket_types(self, node: GraphNode) -> dict[str, str]:
        """The linked inputs whose values get their socket type's value check, with that type."""
        specs = node.node_cls.input_specs()
        return {name: specs[name].type for name in node.links if name in specs and not specs[name].raw_link}

    async def call_mapped(self, node: GraphNode, ctx: NodeContext, inputs: dict[str, list[Any]]) -> list[Any]:
        results: list[Any] = []
        checks = self.executor.registry.value_checks
        socket_types = self.socket_types(node)
        for index in range(self.call_count(node, inputs)):
            self.interrupt.check()
            kwargs = self.call_inputs(node, inputs, index)
            blocker = _blocker(kwargs.values(), node.node_cls.input_is_list)
            if blocker is not None:
                if blocker.message is not None:
                    self.report_blocked(node, blocker.message)
                # Downstream the block carries no message: the error is reported once, by the first node it stops.
                results.append(tuple(ExecutionBlocker() for _ in node.node_cls.outputs))
                continue
            checks.check_call(socket_types, kwargs, node.node_cls.input_is_list)
            outcome = node.node_cls.model_construct(**kwargs).run(ctx)
            if inspect.isawaitable(outcome):
                outcome = await outcome
            results.append(outcome)
        return results

    def report_blocked(self, node: GraphNode, message: str) -> None:
        """A blocker with a message sends execution_error (ComfyUI's shape for it) naming the node it stopped;
        the run goes on and may still succeed."""
        self.emit(lambda: ExecutionError(
            prompt_id=self.prompt_id, node_id=node.display, node_type=node.class_type, executed=list(self.executed),
            exception_message=f"Execution Blocked: {message}", exception_type="ExecutionBlocked", traceback=[],
            current_inputs=[], current_outputs=[]))

    def normalise(self, node: GraphNode, outcome: Any) -> NodeOutput:
        if isinstance(outcome, NodeOutput):
            return outcome
        if outcome is None:
            return NodeOutput(values=())
        if isinstance(outcome, ExecutionBlocker):
            return NodeOutput(values=tuple(outcome for _ in node.node_cls.outputs))
        if isinstance(outcome, tuple):
            return NodeOutput(values=outcome)
        if len(node.node_cls.outputs) == 1:
            return NodeOutput(values=(outcome,))
        raise TypeError(f"{node.class_type}.run returned {type(outcome).__name__}, expected a tuple or NodeOutput")

    def merge_or_expand(self, node: GraphNode, results: list[Any]) -> Outcome:
        outputs = [self.normalise(node, r) for r in results]
        expected = len(node.node_cls.outputs)
        for out in outputs:
            if out.expand is None and len(out.values) != expected:
                raise TypeError(f"{node.class_type} returned {len(out.values)} values for {expected} outputs")
        if not any(out.expand for out in outputs):
            return "done", self.merge(node, [out.values for out in outputs], [out.ui for out in outputs])
        waits: list[str] = []
        for index, out in enumerate(outputs):
            if out.expand:
                mapping = self.add_fragment(node, index, out.expand)
                values = []
                for value in out.values:
                    link = _as_link(value)
                    if link is not None:
                        link = Link(mapping.get(link.source, link.source), link.slot)
                        waits.append(link.source)
                        value = link
                    values.append(value)
                out.values = tuple(values)
        self.expansions[node.id] = ([out.values for out in outputs], _merge_ui([out.ui for out in outputs]))
        return "wait", waits

    def collect_expansion(self, node: GraphNode) -> tuple[list[list[Any]], UiData | None]:
        per_call, ui = self.expansions.pop(node.id)
        resolved: list[tuple[Any, ...]] = []
        for values in per_call:
            row = []
            for slot, value in enumerate(values):
                if isinstance(value, Link):
                    produced = self.values[value.source][value.slot]
                    value = produced if node.node_cls.outputs[slot].is_list else produced[0]
                row.append(value)
            resolved.append(tuple(row))
        return self.merge(node, resolved, [ui])

    def merge(self, node: GraphNode, per_call: list[tuple[Any, ...]], uis: list[UiData | None]
              ) -> tuple[list[list[Any]], UiData | None]:
        outputs: list[list[Any]] = []
        for slot, spec in enumerate(node.node_cls.outputs):
            column: list[Any] = []
            for values in per_call:
                value = values[slot]
                if spec.is_list and isinstance(value, (list, tuple)):
                    column.extend(value)
                elif spec.is_list and isinstance(value, ExecutionBlocker):
                    column.append(value)
                else:
                    column.append(value)
            outputs.append(column)
        ui = _merge_ui(uis)
        if ui:
            self.emit(lambda: Executed(prompt_id=self.prompt_id, node=node.id, display_node=node.display, output=ui))
        return outputs, ui

    def add_fragment(self, parent: GraphNode, call_index: int, fragment: dict[str, dict[str, Any]]) -> dict[str, str]:
        """Add an expansion's nodes under deterministic ids '<parent>.<call>.<id>' (so they hit the cache on the
        next run); returns the id mapping. A cycle inside the fragment is an error of the expanding node."""
        prefix = f"{parent.id}.{call_index}."
        mapping = {str(local): prefix + str(local) for local in fragment}
        added: list[str] = []
        for local, body in fragment.items():
            new_id = mapping[str(local)]
            if new_id in self.nodes:
                raise ValueError(f"expansion reused node id {new_id}")
            body = dict(body)
            body["inputs"] = {name: _relink(value, mapping) for name, value in dict(body.get("inputs", {})).items()}
            node, errors, fatal = build_node(new_id, body, self.executor.registry, self.checker)
            if fatal is not None:
                raise ValueError(f"expansion node {local}: {fatal['message']}")
            assert node is not None  # build_node gives a node whenever it reports no prompt-level error
            node.parent = parent.id
            node.display_id = parent.display
            self.nodes[new_id] = node
            added.append(new_id)
            if errors:
                raise ValueError(f"expansion node {local} ({node.class_type}): "
                                 + "; ".join(f"{e['message']}: {e['details']}" for e in errors))
        for new_id in added:
            link_errors: list[dict[str, Any]] = []
            check_links(self.nodes[new_id], self.nodes, link_errors)
            if link_errors:
                raise ValueError(f"expansion node {new_id}: " + "; ".join(e["details"] for e in link_errors))
        sub = dependency_graph(self.nodes, added)
        cycles = find_cycles(sub.subgraph(added))
        if cycles:
            raise DependencyCycleError(f"expansion created a dependency cycle: {' -> '.join(cycles[0])}")
        self.compute_keys([n for n in nx.topological_sort(sub) if n in mapping.values()])
        self.schedule([n for n in added if self.nodes[n].node_cls.output_node])
        return mapping


def _as_link(value: Any) -> Link | None:
    if isinstance(value, Link):
        return value
    return parse_link(value) if isinstance(value, list) else None


def _relink(value: Any, mapping: dict[str, str]) -> Any:
    link = parse_link(value)
    if link is not None and link.source in mapping:
        return [mapping[link.source], link.slot]
    return value


def _blocker(values: Iterable[Any], input_is_list: bool) -> ExecutionBlocker | None:
    """The first blocker among a call's inputs (inside list inputs too), preferring one with a message."""
    found = None
    for value in values:
        items = value if input_is_list and isinstance(value, list) else [value]
        for item in items:
            if isinstance(item, ExecutionBlocker):
                if item.message is not None:
                    return item
                found = found or item
    return found


def _merge_ui(uis: list[UiData | None]) -> UiData | None:
    merged: dict[str, list[Any]] | None = None
    for ui in uis:
        if not ui:
            continue
        merged = merged or {}
        for key, value in ui.items():
            merged.setdefault(key, []).extend(value if isinstance(value, list) else [value])
    return merged
