"""Errors raised by convc. Every one is a :class:`ConvcError`.

Messages name what is wrong: the node, its op, the shapes involved and the
rule that was broken, so a user can fix the graph without reading convc.
"""


class ConvcError(Exception):
    """Base class of every error convc raises on purpose."""


class GraphError(ConvcError):
    """The graph is malformed: unknown value, duplicate name, bad structure."""


class ValidationError(GraphError):
    """An op's attributes or input shapes break one of its rules."""


class InputError(ConvcError):
    """Arrays given to ``Module.run`` do not match the graph's inputs."""


class CompileError(ConvcError):
    """The C compiler rejected generated code; the message holds its output."""


class RuleError(Exception):
    """Raised inside op definitions; the graph wraps it in a ValidationError
    that names the node, op and shapes. Never escapes to users."""


def format_node_error(node: str, op: str, shapes: dict, rule: str) -> str:
    shown = ", ".join(f"{k} {tuple(v) if v is not None else None}" for k, v in shapes.items())
    return f"node '{node}' ({op}): {rule} [inputs: {shown}]"
