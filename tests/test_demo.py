"""mtllama-demo end to end on a shrunken demo.gin: the files it promises, and its tables."""

import json
import os

import gin
import pytest

from mtllama_jax.main import demo


@pytest.fixture(autouse=True)
def clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()


def test_demo_trains_evaluates_and_reports(tmp_path):
    run_dir = tmp_path / "demo"
    assert (
        demo.main(
            [
                "--gin_file=runs/demo.gin",
                f"--gin.DEMO_DIR='{run_dir}'",
                "--gin.TRAIN_STEPS=4",
                "--gin.SEQUENCE_LENGTH=128",
                "--gin.LoopPeriods.eval_every_steps=2",
                "--gin.CheckpointPolicy.every_steps=2",
                "--gin.synthetic_sizes.train=64",
                "--gin.synthetic_sizes.validation=4",
                "--gin.demo.max_new_tokens=2",
                "--gin.LlamaConfig.num_layers=1",
                "--gin.LlamaConfig.hidden_size=32",
                "--gin.LlamaConfig.intermediate_size=64",
            ]
        )
        == 0
    )
    for name in ("results.md", "results.json", "results.png", "loss.png"):
        assert os.path.getsize(run_dir / name) > 0, name
    model_dir = run_dir / "model"
    assert {"config.json", "tokenizer.model", "config.gin", "metrics.jsonl"} <= set(
        os.listdir(model_dir)
    )
    assert "4" in os.listdir(model_dir / "checkpoints")

    runs = json.loads((run_dir / "results.json").read_text())
    assert list(runs) == ["before training", "after training"]
    for results in runs.values():
        evaluated = set(results["tasks"])
        assert any(n.startswith("synthetic_nli") for n in evaluated)  # a held-out cluster
        for result in results["tasks"].values():
            assert result["examples"] == 4
            assert {"rank", "generate"} <= set(result)
    table = (run_dir / "results.md").read_text()
    assert "| Unseen templates (of trained tasks) |" in table
    assert "| Unseen tasks (clusters never trained on) |" in table
    assert "| - nli (unseen task) | 50.0 |" in table  # each held-out cluster, its own chance
    assert "| - completion (unseen task) | 33.3 |" in table
