"""The support matrix: every Mixture-of-Experts model type of transformers, and what reap verified on it.

The matrix lives in ``families.json`` beside this module, written by the test that checks every model type
(``tests/test_matrix.py``: a tiny checkpoint saved by transformers in several shards is calibrated, its statistics
compared with hooks on transformers' own experts, pruned, and the pruned checkpoint loaded by transformers and
compared with the original with those experts removed in memory). ``reap inspect --families`` and the README's
table are made from it; model types of the installed transformers that the file does not list say so.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

MATRIX_NAME = "families.json"
#: what a "verified" entry went through (the steps of tests/test_matrix.py)
VERIFIED = ("tiny checkpoint saved by transformers (several shards); statistics == hooks on transformers' experts "
            "(fp32, padded batches); pruned checkpoint loads with no missing/unexpected weights and its logits == the "
            "original with the pruned experts removed in memory; kept tensors byte-identical; only the expert-count "
            "keys of config.json change; streamed eval == transformers' loss")


def load_matrix() -> dict[str, Any]:
    """The committed matrix: {"transformers": version, "model_types": {type: {"status", "reason"?, ...}}}."""
    text = resources.files("reap.model").joinpath(MATRIX_NAME).read_text()
    return json.loads(text)


def installed_moe_types() -> list[str]:
    """MoE model types of the installed transformers (those on its standard experts interface)."""
    from reap.model.moe_types import moe_model_types

    return moe_model_types()


def describe_families() -> list[dict[str, Any]]:
    """One row per model type of the installed transformers or the matrix: status and what was checked or why not."""
    import transformers

    matrix = load_matrix()
    entries = matrix["model_types"]
    installed = set(installed_moe_types())
    rows = []
    for model_type in sorted(installed | set(entries)):
        entry = dict(entries.get(model_type) or {"status": "not checked",
                                                  "reason": f"not in the matrix made with transformers "
                                                            f"{matrix['transformers']}"})
        if model_type not in installed:
            entry["note"] = f"not implemented by the installed transformers {transformers.__version__}"
        rows.append({"model_type": model_type, **entry})
    return rows


def support(model_type: str) -> dict[str, str]:
    """What the matrix says of one model type (transformers' type: aliases resolved): ``status`` (verified,
    unsupported or not checked) and a sentence for logs, ``reap inspect`` and the report."""
    import transformers

    matrix = load_matrix()
    made, installed = matrix["transformers"], transformers.__version__
    entry = matrix["model_types"].get(model_type)
    if entry is None:
        return {"status": "not checked",
                "text": f"{model_type} is not in the matrix of transformers {made} (installed: {installed}): reap "
                        "checks its reading of the experts against transformers' own at run time (self-check)"}
    version = f"transformers {made}" + ("" if made == installed else f", installed {installed}")
    if entry["status"] == "verified":
        return {"status": "verified", "text": f"{model_type} verified end to end ({version})"}
    return {"status": entry["status"], "text": f"{model_type} {entry['status']} ({version}): {entry.get('reason', '')}"}


def format_families(rows: list[dict[str, Any]]) -> str:
    """The human-readable form of :func:`describe_families`."""
    matrix = load_matrix()
    verified = [r for r in rows if r["status"] == "verified"]
    lines = [f"{len(verified)} of {len(rows)} MoE model types verified (matrix made with transformers "
             f"{matrix['transformers']}); verified means: {VERIFIED}", ""]
    width = max(len(r["model_type"]) for r in rows)
    for r in rows:
        detail = r.get("layout") if r["status"] == "verified" else r.get("reason", "")
        note = f" [{r['note']}]" if r.get("note") else ""
        lines.append(f"{r['model_type']:<{width}}  {r['status']:<13} {detail}{note}")
    lines += ["", mtp_sentence()]
    return "\n".join(lines)


def mtp_sentence() -> str:
    """What happens to multi-token-prediction modules, from the styles reap knows (reap.model.arch.MTP_STYLES)."""
    from reap.model.arch import MTP_STYLES

    styles = "; ".join(f"{s.name}: {s.prefix.format(layers='model.layers.', n='N', k='k')}{{{s.embed_norm}, "
                       f"{s.hidden_norm}, {s.proj}, {s.final_norm}}} + {s.layer.format(layers='model.layers.', n='N', k='k')}*"
                       for s in MTP_STYLES)
    return ("multi-token-prediction (MTP) modules are kept: calibrated after the last decoder layer and pruned like "
            f"every layer, so MTP speculative decoding keeps working (--drop-mtp leaves them out); stored as {styles}")


def markdown_table(matrix: dict[str, Any] | None = None) -> str:
    """The README's support table, from the matrix."""
    matrix = matrix or load_matrix()
    lines = ["| model type | status | layout or reason |", "|---|---|---|"]
    for model_type, entry in sorted(matrix["model_types"].items()):
        detail = entry.get("layout") if entry["status"] == "verified" else entry.get("reason", "")
        lines.append(f"| `{model_type}` | {entry['status']} | {str(detail).replace('|', '/')} |")
    return "\n".join(lines)
