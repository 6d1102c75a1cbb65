"""Task metadata: a plain task by default, one record per task, matchers checked by name."""

import pytest

from mtllama_jax import task_metadata
from mtllama_jax.task_metadata import TaskInfo


def test_unrecorded_task_is_plain():
    assert task_metadata.task_info("metadata_test_never_recorded") == TaskInfo()
    assert TaskInfo() == TaskInfo(zero_shot_set=None, t0_dataset=None, matcher=None)


def test_record_again_is_a_no_op_and_a_different_record_is_named():
    info = TaskInfo(zero_shot_set="rte", matcher="rte")
    task_metadata.record("metadata_test_rte", info)
    task_metadata.record("metadata_test_rte", info)
    assert task_metadata.task_info("metadata_test_rte") == info
    with pytest.raises(ValueError, match="'metadata_test_rte': already recorded"):
        task_metadata.record("metadata_test_rte", TaskInfo(t0_dataset="super_glue_rte"))


def test_unknown_matcher_names_the_field():
    with pytest.raises(ValueError, match="TaskInfo.matcher='squad'"):
        TaskInfo(zero_shot_set="squad", matcher="squad")
