"""How calibration records of the common dataset shapes become chat messages.

Published REAP recipes calibrate on chat data with the model's chat template applied. Records arrive in a
handful of shapes; each becomes ``(messages, tools)`` the same documented way, and the tokenizer's chat
template turns that into token ids:

=======================================  =====================================================================
record fields                            messages
=======================================  =====================================================================
``messages`` (list, or a JSON string)    as they are (OpenAI style, incl. ``tool_calls`` and ``tool`` turns);
                                         a record-level ``tools`` list is passed to the template
``conversations`` (ShareGPT)             ``from``: human/user -> user, gpt/assistant -> assistant, system,
                                         tool/observation/function_response -> tool; ``value`` -> content
``instruction`` + ``output``             user: instruction (+ a blank line + ``input`` when non-empty),
(Alpaca, evol-codealpaca)                assistant: output
``query`` + ``answers`` [+ ``tools``]    user: query; assistant: ``tool_calls`` built from answers
(xLAM function calling)                  (``[{"name", "arguments"}]``, JSON strings decoded); tools -> template
``prompt`` + ``completion``/``response``  user: prompt, assistant: completion
=======================================  =====================================================================
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from reap.core.errors import UserError

Chat = tuple[list[dict[str, Any]], list[dict[str, Any]] | None]
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
                  "tool": "tool", "observation": "tool", "function_response": "tool", "function_call": "assistant"}


def _maybe_json(value: Any, where: str, field: str, expected: str) -> Any:
    """Datasets often store nested fields as JSON strings: decode them."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            raise UserError(f"{where}: field {field!r} must be {expected} (or its JSON text), "
                            "but it is a string that is not JSON: fix that record") from None
    return value


def _tools(record: Mapping[str, Any], where: str) -> list[dict[str, Any]] | None:
    tools = record.get("tools")
    if tools in (None, "", []):
        return None
    tools = _maybe_json(tools, where, "tools", "a list of tool definitions")
    if not isinstance(tools, list):
        raise UserError(f"{where}: field 'tools' must be a list of tool definitions")
    # bare {name, description, parameters} -> the OpenAI function shape most chat templates expect
    return [t if "type" in t else {"type": "function", "function": t} for t in tools]


def to_chat(record: Mapping[str, Any], where: str, messages_field: str = "messages") -> Chat | None:
    """``(messages, tools)`` for a chat-shaped record (see the module table), or None if it is not one."""
    if record.get(messages_field) is not None:
        messages = _maybe_json(record[messages_field], where, messages_field,
                               "a list of {role, content} objects")
        if not isinstance(messages, list) or not all(isinstance(m, Mapping) for m in messages):
            raise UserError(f"{where}: field {messages_field!r} must be a list of {{role, content}} objects: "
                            "fix the data or name the text field with --text-field")
        return [dict(m) for m in messages], _tools(record, where)
    if isinstance(record.get("conversations"), list):
        messages = []
        for turn in record["conversations"]:
            role = SHAREGPT_ROLES.get(str(turn.get("from", "")).lower())
            if role is None:
                raise UserError(f"{where}: conversation turn from {turn.get('from')!r} is not one of "
                                f"{sorted(SHAREGPT_ROLES)}")
            messages.append({"role": role, "content": turn.get("value", "")})
        return messages, _tools(record, where)
    if record.get("instruction") is not None and record.get("output") is not None:
        prompt = str(record["instruction"])
        if record.get("input"):
            prompt += "\n\n" + str(record["input"])
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": str(record["output"])}], None
    if record.get("query") is not None and record.get("answers") is not None:
        answers = _maybe_json(record["answers"], where, "answers", "a list of {name, arguments} calls")
        if not isinstance(answers, list):
            raise UserError(f"{where}: field 'answers' must be a list of {{name, arguments}} calls")
        calls = [{"type": "function", "function": {"name": a.get("name"),
                                                   "arguments": _maybe_json(a.get("arguments", {}), where, "arguments", "an object")}}
                 for a in answers]
        return [{"role": "user", "content": str(record["query"])},
                {"role": "assistant", "content": "", "tool_calls": calls}], _tools(record, where)
    completion = record.get("completion", record.get("response"))
    if record.get("prompt") is not None and completion is not None:
        return [{"role": "user", "content": str(record["prompt"])}, {"role": "assistant", "content": str(completion)}], None
    return None
