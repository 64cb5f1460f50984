"""Where recovery applies: `reap prune --ratio 0.5 --merge fold --refit-router` on a tiny random checkpoint of every
verified model type of the installed transformers (CPU), one JSON line each: exit code, the merges and re-fit layers,
the layers that kept their cut and why. Results: benchmarks/results/recovery_families_*.jsonl.

    PYTHONPATH=src python benchmarks/recovery_families.py > benchmarks/results/recovery_families_cpu_DATE.jsonl
"""
import json, sys, tempfile, traceback
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from typer.testing import CliRunner
from reap.cli import app
from reap.testing.tiny import make_tiny_model
from helpers import python_snippets
fams = json.loads((Path(__file__).resolve().parents[1] / "src" / "reap" / "model" / "families.json").read_text())
types = [t for t, v in fams["model_types"].items() if v.get("status") == "verified"]
print(len(types), file=sys.stderr)
root = Path(tempfile.mkdtemp())
data = root / "d.jsonl"
data.write_text("".join(json.dumps({"text": t}) + "\n" for t in python_snippets(12)))
done = set(sys.argv[1:])  # types to leave out
for t in [t for t in types if t not in done]:
    try:
        src = make_tiny_model(root / t, family=t)
        res = CliRunner().invoke(app, ["prune", str(src), "--ratio", "0.5", "--dataset", str(data), "--device", "cpu", "--max-length", "64",
                                       "--merge", "fold", "--refit-router", "--recover-tokens", "128", "--out", str(root / (t + "-out")), "-q"])
        rec = None
        if res.exit_code == 0:
            rep = json.loads((root / (t + "-out") / "reap_report.json").read_text())["recovery"]
            skipped = {l: r.get("skipped") for l, r in rep["layers"].items() if r.get("skipped")}
            notmerged = {l: r.get("merge") for l, r in rep["layers"].items() if isinstance(r.get("merge"), str)}
            rec = {"merged": rep["merged_experts"], "refit": len(rep["refit_layers"]), "layers": len(rep["layers"]), "skipped": skipped, "notmerged": notmerged}
        print(json.dumps({"type": t, "exit": res.exit_code, "out": (res.output.strip().splitlines() or [""])[-1][:300] if res.exit_code else "", "rec": rec,
                          "exc": "".join(traceback.format_exception(res.exception))[-800:] if res.exit_code not in (0, 2) and res.exception else ""}), flush=True)
    except Exception as e:
        print(json.dumps({"type": t, "error": repr(e)[:300]}), flush=True)
