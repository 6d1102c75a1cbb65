"""launch: other libraries' logs are quiet without --verbose; the project's own messages stay."""

import logging
import warnings

import pytest

from mtllama_jax.main import launch

LOGGERS = ("", "mtllama_jax", "absl", "tensorflow", "transformers", "jax", "orbax")


@pytest.fixture
def restore_logging(monkeypatch):
    for name in ("TF_CPP_MIN_LOG_LEVEL", "TRANSFORMERS_VERBOSITY"):
        monkeypatch.delenv(name, raising=False)
    levels = {name: logging.getLogger(name).level for name in LOGGERS}
    for name in LOGGERS:  # as in a fresh process (jobs run in this one set them before)
        logging.getLogger(name).setLevel(logging.WARNING if name == "" else logging.NOTSET)
    yield
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def test_quiet_keeps_the_projects_messages_and_drops_other_libraries(restore_logging, caplog):
    launch.configure_logs(False)
    logging.getLogger("absl").warning("absl noise")
    logging.getLogger("orbax.checkpoint").warning("orbax noise")
    logging.getLogger("some.library").warning("library noise")
    logging.getLogger("mtllama_jax.tasks.zeroshot").warning("3 of 9 contexts cut")
    logging.getLogger("absl").error("a real error")
    assert [r.getMessage() for r in caplog.records] == ["3 of 9 contexts cut", "a real error"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.warn_explicit("library warning", UserWarning, "lib.py", 1, module="somelib")
        warnings.warn_explicit("our warning", UserWarning, "x.py", 1, module="mtllama_jax.x")
    assert [str(w.message) for w in caught] == ["our warning"]


def test_verbose_leaves_every_library_at_its_defaults(restore_logging, caplog):
    launch.configure_logs(True)
    logging.getLogger("absl").warning("absl noise")
    assert [r.getMessage() for r in caplog.records] == ["absl noise"]
