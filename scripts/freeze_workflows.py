"""Freeze today's example workflows as a release's fixtures (tests/fixtures/workflows/<version>/):
each UI workflow as shipped and the API prompt the frontend queues for it, against a running ComfyUI
with LoRA Lab installed. Frozen folders are never edited; the tests keep them working.

    python scripts/freeze_workflows.py 2026-12-06 --url http://127.0.0.1:8188
"""

from __future__ import annotations

import argparse
import json
import shutil
import urllib.request
from pathlib import Path

from frontend_rules import ui_to_api

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "workflows"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("version", help="the folder name, e.g. the release date")
    parser.add_argument("--url", default="http://127.0.0.1:8188", help="a running ComfyUI with LoRA Lab")
    args = parser.parse_args()
    out = FIXTURES / args.version
    if out.exists():
        raise SystemExit(f"{out} exists: frozen fixtures are never rewritten; choose another version.")
    with urllib.request.urlopen(f"{args.url}/object_info", timeout=60) as response:
        object_info = json.loads(response.read())
    out.mkdir(parents=True)
    for path in sorted((REPO / "example_workflows").glob("*.json")):
        shutil.copyfile(path, out / path.name)
        prompt = ui_to_api(json.loads(path.read_text()), object_info)
        (out / f"{path.stem}.api.json").write_text(json.dumps(prompt, indent=1) + "\n")
        print(f"froze {path.name}")


if __name__ == "__main__":
    main()
