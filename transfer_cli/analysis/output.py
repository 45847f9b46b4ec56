"""Where an analysis lands: `<run>/analysis/<name>.json`, `.md` and `.png`, each written atomically.

Plots use matplotlib's object API (`Figure`, rendered by Agg on save), so no pyplot state or GUI
backend is touched.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from matplotlib.figure import Figure

from transfer_cli.io import atomic_path, write_json
from transfer_cli.run_folder import RunFolder


def output_name(kind: str, other: Path | None = None) -> str:
    """`cka` against the pretrained backbone / the initial weights; `cka_<other run's folder>` for a pair."""
    if other is None:
        return kind
    return f"{kind}_{re.sub(r'[^A-Za-z0-9_.-]+', '_', Path(other).resolve().name)}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(value: Any) -> str:
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


@dataclass
class Analysis:
    """One analysis' result: `name` is the file stem, `table` the JSON, `markdown` what is printed."""

    name: str
    table: dict
    markdown: str
    figure: Figure

    def write(self, run_dir: Path) -> Path:
        """Write the table (JSON + markdown) and the plot into `<run_dir>/analysis/`; return that folder."""
        folder = RunFolder(run_dir).analysis_dir
        write_json(folder / f"{self.name}.json", self.table)
        with atomic_path(folder / f"{self.name}.md") as tmp:
            tmp.write_text(self.markdown + "\n")
        with atomic_path(folder / f"{self.name}.png") as tmp:
            self.figure.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
        return folder
