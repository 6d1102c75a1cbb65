"""Every model preset parses with gin and has the published parameter count."""

import gin
import pytest

from mtllama_jax.main import launch
from mtllama_jax.main.gin_configurables import GIN_DIR, model_config_from_gin

PUBLISHED_PARAMS = {
    "llama_7b": 6_738_415_616,
    "llama_13b": 13_015_864_320,
    "llama_33b": 32_528_943_616,
    "llama_65b": 65_285_660_672,
    "llama2_7b": 6_738_415_616,
    "llama2_13b": 13_015_864_320,
    "llama2_70b": 68_976_648_192,
    "llama3_8b": 8_030_261_248,
    "llama3_1_8b": 8_030_261_248,
    "mtllama_7b": 6_738_415_616 + 2 * 4096,  # one more row in embedding and LM head
}


@pytest.mark.parametrize("preset", sorted(PUBLISHED_PARAMS))
def test_preset_parameter_count(preset):
    gin.clear_config()
    launch.parse_gin([f"models/{preset}.gin"], [])  # the jobs' lookup: includes found on disk
    config = model_config_from_gin()
    gin.clear_config()
    assert config.num_params == PUBLISHED_PARAMS[preset]


def test_every_preset_is_checked():
    presets = {p.stem for p in (GIN_DIR / "models").glob("*.gin")} - {"tiny"}
    assert presets == set(PUBLISHED_PARAMS)
