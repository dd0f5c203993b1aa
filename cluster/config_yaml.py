"""The plumbing under ``cluster.config``: a strict YAML reader and plain-language errors.

Knows nothing of the config tree itself (the root model is passed in), so
``cluster.config`` can import it without a cycle. Use ``cluster.config``.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from typing import Any

import yaml
from pydantic import BaseModel


class FieldProblems(ValueError):
    """Raised inside validators: (sub-path, reason) pairs relative to the model being validated.

    Pydantic reports a validator's error at the model's own path; carrying the
    sub-path lets a message point at the exact field, and carrying a list lets
    one validator report several problems at once.
    """

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{p}: {r}" if p else r for p, r in problems))


class StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys and reads ``2:1`` as a string.

    PyYAML silently keeps the last of duplicate keys (a setting ignored), and
    follows YAML 1.1 in reading an unquoted ``2:1`` as the base-60 int 121.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


# Copy the resolver table so SafeLoader itself is left alone, then put a
# "sexagesimal is a string" rule ahead of the int rule that would match first.
StrictLoader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_SEXAGESIMAL = re.compile(r"^[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+$")
for _first in "+-0123456789":
    StrictLoader.yaml_implicit_resolvers.setdefault(_first, []).insert(0, ("tag:yaml.org,2002:str", _SEXAGESIMAL))


def read_yaml(text: str) -> Any:
    """Parse YAML text with :class:`StrictLoader`; ValueError with a one-line "line L, column C" reason."""
    try:
        return yaml.load(text, Loader=StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = ", ".join(str(p) for p in (exc.context, exc.problem) if p)
        raise ValueError(f"invalid YAML{where}: {what}") from exc
    except yaml.YAMLError as exc:
        raise ValueError(f"invalid YAML: {exc}") from exc


def describe_error(err: Mapping[str, Any], root: type[BaseModel]) -> list[str]:
    """One pydantic error dict (from ``ValidationError.errors()``) -> ``"<dotted.path>: <reason>"`` lines."""
    loc = tuple(str(part) for part in err["loc"])
    ctx, kind, got = err.get("ctx") or {}, err["type"], err.get("input")
    if kind == "value_error" and isinstance(ctx.get("error"), FieldProblems):
        return [f"{_path(loc + tuple(p.split('.') if p else ()))}: {r}" for p, r in ctx["error"].problems]
    if kind == "extra_forbidden":
        return [f"{_path(loc)}: unknown field{_did_you_mean(loc, root)}"]
    # Pydantic's own wording ("Input should be ...") is fine but generic; these
    # are the kinds a YAML author hits, said the way the docs say them.
    reasons = {
        "value_error": str(ctx.get("error")),
        "missing": "required",
        "greater_than_equal": f"must be >= {_num(ctx.get('ge'))}",
        "greater_than": f"must be > {_num(ctx.get('gt'))}",
        "less_than_equal": f"must be <= {_num(ctx.get('le'))}",
        "less_than": f"must be < {_num(ctx.get('lt'))}",
        "literal_error": f"must be {ctx.get('expected')}; got {got!r}",
        "int_type": f"must be an integer; got {got!r}",
        "float_type": f"must be a number; got {got!r}",
        "finite_number": f"must be a finite number; got {got!r}",
        "string_type": f"must be a string; got {got!r}",
        "string_too_short": "must not be empty",
        "model_type": f"must be a mapping of fields; got {got!r}",
    }
    return [f"{_path(loc)}: {reasons.get(kind, err['msg'])}"]


def _num(bound: Any) -> Any:
    # Pydantic turns a float field's ``gt=0`` into 0.0; say "> 0" as written.
    return int(bound) if isinstance(bound, float) and bound.is_integer() else bound


def _path(loc: tuple[str, ...]) -> str:
    return ".".join(loc) or "<top level>"


def _did_you_mean(loc: tuple[str, ...], root: type[BaseModel]) -> str:
    """Suggest the closest known field for an unknown one, else list the known fields."""
    model = root
    for part in loc[:-1]:
        field = model.model_fields.get(part)
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return ""
        model = field.annotation
    known = list(model.model_fields)
    close = difflib.get_close_matches(loc[-1], known, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else f" (known fields: {', '.join(known)})"
