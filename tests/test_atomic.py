"""Atomic writes: the mode a plain open() gives under the umask, and nothing left on failure."""

import os
import stat

import pytest

from mtllama_jax import atomic, checkpoints, metrics
from mtllama_jax.main import eval as eval_job
from mtllama_jax.models.llama.config import LlamaConfig

RUN = {
    "tasks": {
        "zeroshot_rte": {
            "set": "rte",
            "examples": 4,
            "rank": {"accuracy": 100.0, "accuracy_norm": 75.0},
        }
    },
    "skipped": {},
    "t0_median": {},
}


@pytest.fixture(params=[0o022, 0o027, 0o077, 0o002], ids=oct)
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def plain_mode(folder) -> int:
    with open(folder / "plain", "w"):
        pass
    return mode(folder / "plain")


def test_every_atomic_writer_gives_a_plain_open_files_mode(tmp_path, umask):
    want = plain_mode(tmp_path)
    assert want == 0o666 & ~umask
    src = tmp_path / "private.model"
    src.write_bytes(b"spm")
    src.chmod(0o600)  # a copy gets a new file's mode, not its source's
    atomic.write_text(tmp_path / "a.txt", "a")
    atomic.write_bytes(tmp_path / "b.bin", b"b")
    atomic.copy_file(src, tmp_path / "c.model")
    written = ["a.txt", "b.bin", "c.model"]

    reports = tmp_path / "eval"
    eval_job.write_outputs(RUN, str(reports), "run")
    written += [f"eval/results.{ext}" for ext in ("json", "md", "png")]

    model_dir = tmp_path / "model"
    checkpoints.write_model_dir_files(str(model_dir), LlamaConfig.tiny(), [str(src)], "x = 1")
    (model_dir / "metrics.jsonl").write_text(
        '{"kind": "train", "step": 1}\n{"kind": "train", "step": 2}\n'
    )
    (model_dir / "metrics.jsonl").chmod(want)
    metrics.truncate_jsonl(str(model_dir / "metrics.jsonl"), 1)
    written += [
        f"model/{n}" for n in ("config.json", "tokenizer.model", "config.gin", "metrics.jsonl")
    ]
    assert {name: oct(mode(tmp_path / name)) for name in written} == {
        name: oct(want) for name in written
    }
    assert (model_dir / "metrics.jsonl").read_text() == '{"kind": "train", "step": 1}\n'


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "results.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic.replacing(target) as tmp:
            with open(tmp, "w") as f:
                f.write("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["results.json"]
