"""Copy the model and pair tables of docs/studies/{fidelity-synth,sets-synth,melbench-rp}.md (written by
scripts/export_studies.sh) into docs/results.md between the <!-- FIDELITY_TABLES --> / <!-- SETS_TABLES --> /
<!-- MELBENCH_TABLES --> markers. Usage: python scripts/fill_results.py"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def tables(name: str) -> str:
    text = (ROOT / "docs" / "studies" / f"{name}.md").read_text()
    body = text.split("\n", 2)[2]  # drop the title
    return body.split("\nPlans of the trained checkpoints")[0].strip()


def main() -> None:
    path = ROOT / "docs" / "results.md"
    doc = path.read_text()
    for marker, name in (("FIDELITY_TABLES", "fidelity-synth"), ("SETS_TABLES", "sets-synth"),
                         ("MELBENCH_TABLES", "melbench-rp")):
        start, end = f"<!-- {marker} -->", f"<!-- /{marker} -->"
        a, b = doc.index(start) + len(start), doc.index(end)
        doc = doc[:a] + "\n" + tables(name) + "\n" + doc[b:]
    path.write_text(doc)


if __name__ == "__main__":
    main()
