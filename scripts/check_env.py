"""Checks the virtualenv that `make` built: dependencies consistent, seqio intact.

`pip check` must report nothing except t5's own pins on seqio-nightly and
tfds-nightly, which we deliberately do not install: they would overwrite the
files of seqio 0.0.20 and tensorflow-datasets (t5 goes in with --no-deps).
"""

import importlib.metadata
import subprocess
import sys

DELIBERATELY_ABSENT = (
    "t5 0.9.4 requires seqio-nightly, which is not installed.",
    "t5 0.9.4 requires tfds-nightly, which is not installed.",
)


def main() -> int:
    result = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    problems = [
        line
        for line in result.stdout.splitlines()
        if line.strip()
        and line.strip() not in DELIBERATELY_ABSENT
        and not line.startswith("No broken requirements")
    ]
    if problems:
        print("pip check found broken requirements:\n  " + "\n  ".join(problems))
        return 1
    seqio_version = importlib.metadata.version("seqio")
    if seqio_version != "0.0.20":
        print(f"seqio is {seqio_version}, expected 0.0.20 (reinstall: make clean setup)")
        return 1
    for name in ("seqio-nightly", "tfds-nightly"):
        try:
            importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        print(
            f"{name} is installed and overwrites seqio/tfds files: "
            f"pip uninstall {name}, then make clean setup"
        )
        return 1
    print("environment ok: pip check clean (t5's nightly pins excepted), seqio 0.0.20")
    return 0


if __name__ == "__main__":
    sys.exit(main())
