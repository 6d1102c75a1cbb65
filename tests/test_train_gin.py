"""mtllama-train's flags and gin files: T5X-style flags, near-name errors, the run files."""

import importlib.util

import gin
import pytest

from mtllama_jax.main import launch, train, train_job


@pytest.fixture(autouse=True)
def clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()


def test_flags_are_t5x_style():
    args = train.parse_flags(
        [
            "--gin_file=a.gin",
            "--gin_file",
            "b.gin",
            "--gin.train.batch_size=8",
            "--gin.MODEL_DIR='/x=y'",
            "--gin_search_paths=/p,/q",
        ]
    )
    assert args.gin_file == ["a.gin", "b.gin"]
    assert args.gin_bindings == ["train.batch_size = 8", "MODEL_DIR = '/x=y'"]
    with pytest.raises(SystemExit):
        train.parse_flags(["--steps=3"])


@pytest.mark.parametrize(
    "binding,near",
    [
        ("train.bach_size = 8", "train.batch_size"),
        ("trian.num_steps = 8", "train.num_steps"),
        ("LlamaConfig.hiden_size = 8", "LlamaConfig.hidden_size"),
        ("mesh.fsdb = 8", "mesh.fsdp"),
    ],
)
def test_unknown_binding_lists_near_names(binding, near):
    with pytest.raises(ValueError) as err:
        launch.parse_gin(["runs/finetune.gin"], [binding])
    message = str(err.value)
    assert message.startswith(f"unknown gin binding '{binding.split(' ')[0]}'")
    assert near in message.split("Near names:")[1]


def test_missing_gin_file_names_the_search_paths():
    with pytest.raises(FileNotFoundError, match="runs/nope.gin.*--gin_search_paths"):
        launch.parse_gin(["runs/nope.gin"], [])


def test_mtllama_7b_run_file_is_the_recipe():
    launch.parse_gin(["runs/mtllama_7b.gin", "mesh/fsdp.gin"], ["MODEL_DIR = '/tmp/m'"])
    config = train_job.model_config_from_gin()
    assert (config.vocab_size, config.hidden_size, config.num_layers) == (32001, 4096, 32)
    q = gin.query_parameter
    assert q("%BATCH_SIZE") == 16 and q("%SEQUENCE_LENGTH") == 2048
    assert q("optimizer.learning_rate") == 2e-5 and q("optimizer.weight_decay") == 0.0
    assert q("optimizer.schedule") == "cosine" and q("optimizer.warmup_fraction") == 0.03
    assert q("%MIXTURE") == "t0_train" and q("mesh.rules") == "fsdp"


@pytest.mark.parametrize("mesh_file", ["single", "fsdp", "fsdp_tp"])
def test_mesh_files_build_meshes(mesh_file):
    launch.parse_gin([f"mesh/{mesh_file}.gin"], [])
    if mesh_file == "single":
        gin.bind_parameter("mesh.data", 8)  # this test process has 8 CPU devices
    layout = train_job.mesh()
    assert layout.mesh.devices.size == 8 and layout.rules


def test_cli_reports_a_bad_binding_without_a_traceback(capsys):
    assert train.main(["--gin_file=runs/finetune.gin", "--gin.optimizer.num_step=3"]) == 2
    err = capsys.readouterr().err
    assert "unknown gin binding 'optimizer.num_step'" in err
    assert "optimizer.num_steps" not in err  # set by train, not bindable


@pytest.fixture
def runs_folder_in_cwd(tmp_path, monkeypatch):
    """A working directory holding `runs/` and `models/` folders, importable as packages.

    What `make demo` leaves at the repository root (runs/demo/), where pytest and
    `python -m` put the working directory on sys.path: `runs` and `models` are then
    namespace packages, which gin's package reader cannot open.
    """
    (tmp_path / "runs" / "demo").mkdir(parents=True)
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert importlib.util.find_spec("runs").origin is None  # the shadowing package
    return tmp_path


def test_a_runs_folder_in_the_working_directory_does_not_shadow_gin_files(runs_folder_in_cwd):
    launch.parse_gin(["runs/mtllama_7b.gin"], ["MODEL_DIR = '/tmp/m'"])  # includes models/, runs/
    assert gin.query_parameter("LlamaConfig.num_layers") == 32


def test_a_gin_file_in_the_working_directory_comes_first(runs_folder_in_cwd):
    (runs_folder_in_cwd / "runs" / "mine.gin").write_text(
        "include 'runs/finetune.gin'\ntrain.batch_size = 3\n"
    )
    launch.parse_gin(["runs/mine.gin"], [])
    assert gin.query_parameter("train.batch_size") == 3
    assert gin.query_parameter("%SEQUENCE_LENGTH") == 2048  # from gin/runs/finetune.gin


def test_a_missing_included_file_names_the_including_file(runs_folder_in_cwd):
    (runs_folder_in_cwd / "runs" / "bad.gin").write_text("include 'models/none.gin'\n")
    with pytest.raises(FileNotFoundError, match=r"models/none.gin(.|\n)*runs/bad.gin"):
        launch.parse_gin(["runs/bad.gin"], [])


def test_option_groups_bind_by_class_name_and_name_the_field_at_fault():
    from mtllama_jax.main.gin_configurables import options_from_gin
    from mtllama_jax.train_options import CheckpointPolicy, LoopPeriods, NonfinitePolicy

    launch.parse_gin(
        ["runs/finetune.gin"],
        ["CheckpointPolicy.every_steps = 250", "NonfinitePolicy.action = 'stop'"],
    )
    assert options_from_gin(CheckpointPolicy) == CheckpointPolicy(250, every_minutes=30, keep=3)
    assert options_from_gin(LoopPeriods) == LoopPeriods(log_every_steps=10, eval_every_steps=0)
    assert options_from_gin(NonfinitePolicy).action == "stop"
    with pytest.raises(ValueError, match=r"CheckpointPolicy\.keep must be >= 1, got 0"):
        CheckpointPolicy(keep=0)
    with pytest.raises(ValueError, match=r"NonfinitePolicy\.action='skp': choose one of"):
        NonfinitePolicy(action="skp")
    gin.bind_parameter("CheckpointPolicy.async_save", "yes")
    with pytest.raises(ValueError, match="gin binding CheckpointPolicy.async_save='yes'"):
        options_from_gin(CheckpointPolicy)
