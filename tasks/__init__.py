"""seqio registrations: `import mtllama_jax.tasks` registers every task and mixture.

Data locations are read when data is read (gin or environment), never here:
the tokenizer (`tokenizer_settings.path` / MTLLAMA_TOKENIZER), P3
(`p3_data_dir.path` / MTLLAMA_P3_DIR; also T0's held-out `*_score_eval` subsets),
the zero-shot sets (`eval_data_dir.path` / MTLLAMA_EVAL_DIR), a user's JSON data
(`register_user_task.train_file`). The synthetic tasks of `make demo` carry their
own small vocabulary (`tasks/assets/synthetic_spm.model`).
"""

from mtllama_jax.tasks import mixing, p3, synthetic, t0_eval, user_data, zeroshot  # noqa: F401

p3.register_t0_train()
