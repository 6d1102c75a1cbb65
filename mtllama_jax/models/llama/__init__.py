"""The LLaMA family (LLaMA-1, LLaMA-2, LLaMA-3): `config.py`, `model.py`, `hf_names.py`."""
