"""Recipes: every ``reap prune`` / ``reap calibrate`` option can come from a YAML file (``--config``).

Keys are the long flag names (``max_length`` or ``max-length``); flags given on the command line override
the file. Unknown keys (naming the key meant, where it is a typo) and wrong types are errors before any weight is
read. ``dataset`` may be a list of specs (joined into a mixture). The effective options are recorded in the output
(``reap_report.json``, the stats metadata) so a run can be repeated exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from reap.core.errors import UserError, suggestion


def option_types(*classes: type, skip: tuple[str, ...] = ()) -> dict[str, type]:
    """The Python type of each option a command takes (its recipe keys) when it takes these options classes:
    the declaring field's type (``typing.get_type_hints`` on the dataclass, ``Optional[X]`` -> X)."""
    from reap.core.flags import params

    return {name: param.type for name, param in params(*classes, skip=skip).items()}


def _expected(annotation: Any) -> type:
    return annotation if annotation in (bool, float, int, Path, str) else str


def load_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"--config {path} does not exist; pass a YAML recipe such as configs/mini-m2-ci.yaml") from None
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise UserError(f"--config {path} is not valid YAML{at}; fix the file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"--config {path} must be a mapping of option: value")
    return data


def _convert(key: str, value: Any, want: type, path: Path) -> Any:
    if key == "dataset" and isinstance(value, list) and all(isinstance(v, str) for v in value):
        return ",".join(value)
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if want is Path and isinstance(value, str):
        return Path(value)
    if value is None or (isinstance(value, want) and not (want is int and isinstance(value, bool))):
        return value
    raise UserError(f"--config {path}: {key} must be {want.__name__ if want is not Path else 'a path'}, "
                    f"got {type(value).__name__} {value!r}")


def apply_config(ctx: Any, params: dict[str, Any], types: dict[str, type]) -> dict[str, Any]:
    """Merge ``params['config']`` (YAML) under the flags the user actually typed; returns the effective options.

    ``ctx`` is the click/typer context (for where each value came from), ``types`` the command's option types
    (:func:`option_types`).
    """
    path = params.get("config")
    if path is None:
        return params
    data = load_yaml(path)
    known = {k for k in params if k not in ("config", "ctx")}
    merged = dict(params)
    for raw_key, value in data.items():
        key = str(raw_key).replace("-", "_")
        if key not in known:
            raise UserError(f"--config {path}: unknown key {raw_key!r}; {suggestion(key, known)}known keys: "
                            f"{', '.join(sorted(known))}")
        source = ctx.get_parameter_source(key)
        if source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT"):
            continue  # a flag overrides the file
        merged[key] = _convert(key, value, _expected(types.get(key, str)), path)
    return merged


def effective(params: dict[str, Any]) -> dict[str, Any]:
    """JSON-able view of the options a run used (for reports and stats metadata)."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in sorted(params.items()) if k not in ("ctx",)}
