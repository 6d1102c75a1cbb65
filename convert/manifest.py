"""`manifest.json`: the sha256 and size of every file an output folder holds.

Written last into the staging folder, so a folder with a manifest is complete;
`check` recomputes it after a copy or download and names each file that differs.
"""

from __future__ import annotations

import hashlib
import json
import os

NAME = "manifest.json"


def sha256(path: str, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _files(folder: str) -> list[str]:
    found = []
    for root, _, names in os.walk(folder):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), folder)
            if rel != NAME:
                found.append(rel.replace(os.sep, "/"))
    return sorted(found)


def compute(folder: str) -> dict[str, dict]:
    return {
        rel: {
            "sha256": sha256(os.path.join(folder, rel)),
            "size": os.path.getsize(os.path.join(folder, rel)),
        }
        for rel in _files(folder)
    }


def write(folder: str) -> None:
    with open(os.path.join(folder, NAME), "w") as f:
        json.dump({"files": compute(folder)}, f, indent=1, sort_keys=True)
        f.write("\n")


def check(folder: str) -> int:
    """Recomputes the manifest; raises naming every differing, missing or extra file."""
    path = os.path.join(folder, NAME)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} is missing: only folders written by mtllama-convert carry a manifest"
        )
    with open(path) as f:
        want = json.load(f)["files"]
    got = compute(folder)
    problems = [
        f"{rel}: sha256 differs"
        for rel in sorted(set(want) & set(got))
        if want[rel]["sha256"] != got[rel]["sha256"]
    ]
    problems += [f"{rel}: missing" for rel in sorted(set(want) - set(got))]
    problems += [f"{rel}: not in the manifest" for rel in sorted(set(got) - set(want))]
    if problems:
        raise ValueError(
            f"{folder} does not match its {NAME}:\n  "
            + "\n  ".join(problems)
            + "\nCopy the folder again from its source, or re-run the conversion."
        )
    return len(got)
