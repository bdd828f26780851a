"""The walk of an API-format prompt back from its outputs: each node's inputs checked
against its spec and evaluated once, its failures recorded as ComfyUI's ``node_errors``."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from sfumato.server.apis.comfy.nodes import NODES, PRIMITIVES, Input, choices, folder_entries
from sfumato.server.state import ServerState

# --- errors ------------------------------------------------------------------------------------


class GraphError(Exception):
    """A prompt sfumato cannot run: ComfyUI's 400 body (``error`` and ``node_errors``)."""

    def __init__(self, kind: str, message: str, node_errors: dict[str, Any] | None = None, details: str = "") -> None:
        super().__init__(message)
        self.body = {
            "error": {"type": kind, "message": message, "details": details, "extra_info": {}},
            "node_errors": node_errors or {},
        }


class NodeFailedError(Exception):
    """A node failed; its error is recorded."""


def node_error(kind: str, message: str, details: str, input_name: str | None, received: Any = None) -> dict[str, Any]:
    extra = {"input_name": input_name, "received_value": received} if input_name is not None else {}
    return {"type": kind, "message": message, "details": details, "extra_info": extra}


def _bad_link(name: str, given: Any) -> dict[str, Any]:
    """ComfyUI's error for an input that is neither a value nor a ``[node_id, slot]`` link."""
    return node_error(
        "bad_linked_input", "Bad linked input, must be a length-2 list of [node_id, slot_index]", name, name, given
    )


# --- the walk ------------------------------------------------------------------------------------

Run = Callable[["Walk", str, dict[str, Any]], tuple[Any, ...]]
"""What a node type does: ``run(walk, node_id, input_values)`` gives the node's outputs."""


class Walk:
    """One prompt's walk: ``runs`` says what each node type does (:data:`.runs.RUNS`)."""

    def __init__(self, state: ServerState, graph: Mapping[str, Any], runs: Mapping[str, Run]) -> None:
        self.state, self.graph, self.runs = state, graph, runs
        self.errors: dict[str, dict[str, Any]] = {}
        self.results: dict[str, tuple[Any, ...] | None] = {}  # None: failed, or being evaluated
        self.choices: dict[str, list[str]] = {}

    def class_of(self, node_id: str) -> str:
        entry = self.graph.get(node_id)
        return str(entry.get("class_type", "")) if isinstance(entry, Mapping) else ""

    def fail(self, node_id: str, error: dict[str, Any]) -> NodeFailedError:
        entry = self.errors.setdefault(
            node_id, {"errors": [], "dependent_outputs": [], "class_type": self.class_of(node_id)}
        )
        entry["errors"].append(error)
        return NodeFailedError()

    def refuse(self, node_id: str, input_name: str | None, message: str, received: Any = None) -> NodeFailedError:
        """A value sfumato cannot run (ComfyUI would have): ``exception_during_validation``."""
        details = f"{input_name}: {message}" if input_name else message
        return self.fail(node_id, node_error("exception_during_validation", message, details, input_name, received))

    def node(self, node_id: str) -> tuple[Any, ...]:
        if node_id in self.results:
            result = self.results[node_id]
            if result is None:
                if node_id not in self.errors:  # reached again while being evaluated
                    raise self.refuse(node_id, None, "the graph loops back to this node")
                raise NodeFailedError
            return result
        self.results[node_id] = None
        entry = self.graph.get(node_id)
        if not isinstance(entry, Mapping) or not isinstance(entry.get("inputs", {}), Mapping):
            raise self.fail(
                node_id,
                node_error(
                    "invalid_prompt", "Node is not an object with class_type and inputs", f"node {node_id!r}", None
                ),
            )
        class_type = self.class_of(node_id)
        spec = NODES.get(class_type)
        if spec is None:
            known = ", ".join(NODES)
            raise self.fail(
                node_id,
                node_error(
                    "missing_node_type",
                    f"Node type {class_type!r} is not one sfumato runs",
                    f"sfumato runs: {known}",
                    None,
                ),
            )
        raw = entry.get("inputs", {})
        values: dict[str, Any] = {}
        failed = False
        for name, wanted in spec.inputs.items():
            try:
                values[name] = self.value(node_id, name, wanted, raw)
            except NodeFailedError:
                failed = True
        if failed:
            raise NodeFailedError
        result = self.runs[class_type](self, node_id, values)
        self.results[node_id] = result
        return result

    def value(self, node_id: str, name: str, wanted: Input, raw: Mapping[str, Any]) -> Any:
        if name not in raw:
            if wanted.optional:
                return wanted.default
            raise self.fail(node_id, node_error("required_input_missing", "Required input is missing", name, name))
        given = raw[name]
        linked = isinstance(given, list)
        if linked:
            if len(given) != 2 or not isinstance(given[1], int) or isinstance(given[1], bool):
                raise self.fail(node_id, _bad_link(name, given))
            source = str(given[0])
            if source not in self.graph:
                raise self.fail(
                    node_id,
                    node_error("bad_linked_input", f"Linked node {source!r} is not in the prompt", name, name, given),
                )
            source_spec = NODES.get(self.class_of(source))
            outputs = self.node(source)
            types = source_spec.outputs if source_spec else ()
            slot = given[1]
            if not 0 <= slot < len(types) or (types[slot] != wanted.type and wanted.type not in PRIMITIVES):
                got = types[slot] if 0 <= slot < len(types) else "nothing"
                raise self.fail(
                    node_id,
                    node_error(
                        "return_type_mismatch",
                        "Return type mismatch between linked nodes",
                        f"{name}, received_type({got}) mismatch input_type({wanted.type})",
                        name,
                    ),
                )
            if wanted.type in PRIMITIVES:
                raise self.refuse(node_id, name, f"takes a value, not the output of node {source!r}", given)
            return outputs[slot]
        if wanted.type not in PRIMITIVES:
            raise self.fail(node_id, _bad_link(name, given))
        return self.primitive(node_id, name, wanted, given)

    def primitive(self, node_id: str, name: str, wanted: Input, given: Any) -> Any:
        if wanted.type == "COMBO":
            assert wanted.choices is not None
            allowed = self.choices.setdefault(wanted.choices, choices(self.state, wanted.choices))
            if given not in allowed:
                listed = str(allowed) if len(allowed) <= 20 else f"(list of length {len(allowed)})"
                raise self.fail(
                    node_id,
                    node_error(
                        "value_not_in_list", "Value not in list", f"{name}: '{given}' not in {listed}", name, given
                    ),
                )
            return given
        try:
            if wanted.type == "INT":
                if isinstance(given, bool) or (isinstance(given, float) and not given.is_integer()):
                    raise ValueError(f"{given!r} is not an integer")
                value: Any = int(given)
            elif wanted.type == "FLOAT":
                if isinstance(given, bool):
                    raise ValueError(f"{given!r} is not a number")
                value = float(given)
            elif wanted.type == "BOOLEAN":
                value = bool(given)
            else:
                if not isinstance(given, str):
                    raise ValueError(f"{given!r} is not a string")
                value = given
        except (TypeError, ValueError) as exc:
            message = f"Failed to convert an input value to a {wanted.type} value"
            error = node_error("invalid_input_type", message, f"{name}, {given}, {exc}", name, given)
            raise self.fail(node_id, error) from None
        if wanted.min is not None and value < wanted.min:
            raise self.fail(
                node_id,
                node_error(
                    "value_smaller_than_min", f"Value {value} smaller than min of {wanted.min}", name, name, given
                ),
            )
        if wanted.max is not None and value > wanted.max:
            raise self.fail(
                node_id,
                node_error(
                    "value_bigger_than_max", f"Value {value} bigger than max of {wanted.max}", name, name, given
                ),
            )
        return value

    def entry_name(self, node_id: str, input_name: str, key: str, file_name: str) -> str:
        """The catalog name of a file a COMBO listed (refused if it left its folder since)."""
        name = next((e.name for e in folder_entries(self.state.catalog, key) if e.file_name == file_name), None)
        if name is None:
            raise self.refuse(node_id, input_name, f"{file_name!r} is no longer in its folder", file_name)
        return name
