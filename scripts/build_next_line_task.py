"""Rebuild the shakespeare_next_line task's items from the bundled plays (provenance; not run
by evaluation).

    python scripts/build_next_line_task.py

Writes nvfp4_titan/harness/tasks/shakespeare_next_line.jsonl: 500 four-way questions
(``nvfp4_titan.harness.documents.next_line_items``, seed 0) from data/assets/shakespeare.jsonl.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nvfp4_titan.harness.documents import NEXT_LINE, PLAYS, next_line_items  # noqa: E402


def main() -> None:
    scenes = [json.loads(line) for line in PLAYS.read_text(encoding="utf-8").splitlines()]
    items = next_line_items(scenes)
    NEXT_LINE.write_text("".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items), encoding="utf-8")
    print(f"{NEXT_LINE}: {len(items)} items, {NEXT_LINE.stat().st_size} bytes")


if __name__ == "__main__":
    main()
