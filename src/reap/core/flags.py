"""Declaring a command-line option on its options field, and a command's parameters made from those declarations.

:func:`flag` (and :func:`argument`, :func:`same_as`, :func:`negation`) put a :class:`Flag` into a dataclass field's
metadata; :func:`params` reads the fields of the options classes a command takes into its :class:`Param` list (the
CLI's parameters, a recipe's keys and types), and :func:`build` turns the parsed values back into the frozen
options object (:mod:`reap.core.options` holds the objects). No torch here.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import MISSING, dataclass, field
from typing import Any

_KEY = "reap.cli"  # the key of a field's declaration in its metadata
_AS_FIELD = object()  # a flag whose command-line default is its field's


@dataclass(frozen=True)
class Flag:
    """How one field appears on the command line. No names: the command's positional argument."""

    names: tuple[str, ...]  # ("--out", "-o"), ("--fsync/--no-fsync",)
    metavar: str
    help: str
    cli_default: Any = _AS_FIELD  # the command line's default where it is not the field's (--max-length 2048)
    name: str | None = None  # the parameter (and recipe key) where it is not the long flag's (--json: as_json)

    def param(self, field_name: str) -> str:
        """The command's parameter name and recipe key: the long flag's name (``--max-length``: max_length)."""
        if self.name is not None:
            return self.name
        long = next((n for n in self.names if n.startswith("--")), None)
        return field_name if long is None else long.split("/")[0][2:].replace("-", "_")


@dataclass(frozen=True)
class Negation:
    """A field the command line sets to the opposite of another option (``progress`` = not ``--quiet``)."""

    param: str


def flag(names: str, metavar: str, help: str, *, default: Any = MISSING, cli_default: Any = _AS_FIELD,
         name: str | None = None) -> Any:
    """A dataclass field that is also a CLI option, e.g. ``flag("--max-length", "L", "Truncate ...", default=None,
    cli_default=2048)``. ``names`` are space-separated (``"--out -o"``, ``"--fsync/--no-fsync"``); the metavar is
    "" for a switch. Without a default the object needs the value; the command line's default is then None
    (the command says that it is missing, after the recipe is merged)."""
    declared = Flag(tuple(names.split()), metavar, help, cli_default, name)
    return field(default=default, metadata={_KEY: declared})


def argument(metavar: str, help: str, *, default: Any = MISSING) -> Any:
    """A dataclass field that is the command's positional argument (``MODEL``)."""
    return field(default=default, metadata={_KEY: Flag((), metavar, help)})


def same_as(cls: type, name: str, **kwargs: Any) -> Any:
    """The option another class declares, declared once (``EvalOptions.text_field`` is ``DataOptions``')."""
    other = cls.__dataclass_fields__[name]
    return field(default=other.default, metadata=other.metadata, **kwargs)


def negation(param: str, *, default: bool = True) -> Any:
    """A field the command line sets to ``not <param>`` (``progress: bool = negation("quiet")``)."""
    return field(default=default, metadata={_KEY: Negation(param)})


# -- from the declarations to a command and back ------------------------------------------------------------
@dataclass(frozen=True)
class Param:
    """One parameter of a command, as the options objects it takes declare it."""

    name: str  # the parameter and the recipe key: "max_length"
    flag: Flag
    type: Any  # the field's type without Optional: what a recipe's value must be
    default: Any  # the command line's default
    part: int  # which of the classes given to :func:`params` brings it (its first occurrence)

    @property
    def annotation(self) -> Any:
        return self.type | None if self.default is None else self.type


def _bare(hint: Any) -> Any:
    """``X | None`` / ``Optional[X]`` -> X."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def params(*classes: type, skip: tuple[str, ...] = ()) -> dict[str, Param]:
    """The command-line parameters of a command that takes these options classes, in order, by name.

    Each field with a :func:`flag` is one parameter; a field holding an options object brings that object's
    parameters in its place. A parameter that several fields declare (``--seed`` in ``PruneOptions`` and its
    ``DataOptions``) appears once, where it first occurs, as the outermost class declares it (its help).
    ``skip``: parameter names the command does not take.
    """
    found: list[tuple[str, int, Flag, Any, Any, int]] = []  # (name, depth, flag, type, field default, part)

    def walk(cls: type, depth: int, part: int) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            declared, bare = f.metadata.get(_KEY), _bare(hints[f.name])
            if isinstance(declared, Flag):
                if declared.param(f.name) not in skip:
                    found.append((declared.param(f.name), depth, declared, bare, f.default, part))
            elif declared is None and dataclasses.is_dataclass(bare):
                walk(bare, depth + 1, part)

    for part, cls in enumerate(classes):
        walk(cls, 0, part)
    out: dict[str, Param] = {}
    for name, _, _, _, _, part in found:
        if name in out:
            continue
        same = [f for f in found if f[0] == name]
        _, _, declared, bare, default, _ = min(same, key=lambda f: f[1])
        if any(f[2].names != declared.names or f[3] is not bare for f in same):
            raise TypeError(f"option {name!r} is declared with different flags or types: {same}")
        if declared.cli_default is not _AS_FIELD:
            default = declared.cli_default
        out[name] = Param(name, declared, bare, None if default is MISSING else default, part)
    return out


def build(cls: type, values: dict[str, Any], **given: Any) -> Any:
    """The options object that a command's parsed values describe (``values``: parameter name -> value).

    Each flag field takes its parameter's value where the command has that parameter (else its default); a field
    holding a required options object is built the same way (an optional one, ``PruneOptions.calibration``, only
    when given); ``given`` sets fields directly.
    """
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in given:
            continue
        declared, hint = f.metadata.get(_KEY), hints[f.name]
        if isinstance(declared, Flag):
            if declared.param(f.name) in values:
                kwargs[f.name] = values[declared.param(f.name)]
        elif isinstance(declared, Negation):
            if declared.param in values:
                kwargs[f.name] = not values[declared.param]
        elif dataclasses.is_dataclass(hint):
            kwargs[f.name] = build(hint, values)
    return cls(**kwargs, **given)
