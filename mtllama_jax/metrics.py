"""Training metrics: TensorBoard event files, a JSONL log, a progress bar, and MFU.

Process 0 writes; the others only count. `MetricsWriter` writes
`<model_dir>/metrics.jsonl` (one JSON object per line: step, kind, values) and
TensorBoard events under `<model_dir>/tensorboard/<kind>`. On a resumed run the
JSONL lines after the restored step are dropped first, so the log of a resumed
run reads like the log of an uninterrupted one.

MFU = achieved model FLOPs / the devices' peak. Model FLOPs per token are
6 x (matmul params) for the forward and backward passes, plus the attention
scores and values, 6 x layers x heads x head_dim x length (12x halved: causal).
Peak FLOPs come from `PEAK_FLOPS` (dense bf16, per device) by device kind.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Mapping, Sequence

import jax

from mtllama_jax import atomic
from mtllama_jax.models.llama.config import LlamaConfig

# Dense bf16 peak FLOP/s per device, by a substring of `jax.Device.device_kind`.
# First match wins, so specific names come before their families.
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("V100", 125e12),
    ("TPU v6", 918e12),
    ("TPU v5p", 459e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v4", 275e12),
    ("TPU v3", 123e12),
)


def peak_flops(device_kind: str) -> float | None:
    """Peak dense bf16 FLOP/s of one device of this kind; None when unknown (CPU)."""
    for name, flops in PEAK_FLOPS:
        if name.lower() in device_kind.lower():
            return flops
    return None


def flops_per_token(config: LlamaConfig, length: int) -> float:
    """Training FLOPs per token (forward + backward) of `config` at sequence `length`."""
    attention = 6 * config.num_layers * config.num_heads * config.head_dim * length
    return 6.0 * config.matmul_params + attention


def mfu(config: LlamaConfig, length: int, tokens_per_s: float, devices=None) -> float | None:
    """Model FLOPs utilisation over `devices` (all by default); None on unknown devices."""
    devices = jax.devices() if devices is None else devices
    peak = peak_flops(devices[0].device_kind)
    if peak is None:
        return None
    return flops_per_token(config, length) * tokens_per_s / (peak * len(devices))


class MetricsWriter:
    """TensorBoard + JSONL + tqdm progress bar for one run (process 0 writes)."""

    def __init__(
        self,
        model_dir: str,
        *,
        total_steps: int,
        start_step: int = 0,
        config: LlamaConfig | None = None,
        length: int | None = None,
        progress: bool = True,
        task_names: Sequence[str] = (),
        task_groups: Mapping[str, str] | None = None,
    ):
        """`task_names` (index -> name) and `task_groups` (name -> cluster) for `write_tasks`."""
        self.primary = jax.process_index() == 0
        self.task_names, self.task_groups = list(task_names), dict(task_groups or {})
        self.config, self.length = config, length
        self.path = os.path.join(model_dir, "metrics.jsonl")
        self._tb = {}
        self._bar = None
        if not self.primary:
            return
        os.makedirs(model_dir, exist_ok=True)
        truncate_jsonl(self.path, start_step)
        self._tb_dir = os.path.join(model_dir, "tensorboard")
        if progress:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def write_train(self, step: int, values: Mapping[str, float]) -> None:
        """Train metrics; adds MFU when the device kind's peak is known."""
        values = dict(values)
        if self.config is not None and self.length and "tokens_per_s" in values:
            util = mfu(self.config, self.length, values["tokens_per_s"])
            if util is not None:
                values["mfu"] = util
        self.write(step, values, "train")
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix(loss=f"{values.get('loss', float('nan')):.4f}", refresh=False)

    def write_tasks(self, step: int, nll: Sequence[float], tokens: Sequence[float]) -> None:
        """Loss and response tokens per task (kind `task`) and per cluster (`task_cluster`).

        `nll[i]` and `tokens[i]` are task i's summed loss and tokens since the last
        log; tasks without tokens in that window are left out.
        """
        per_task, per_group = {}, {}
        for name, n, t in zip(self.task_names, nll, tokens):
            if t > 0:
                per_task[f"{name}/loss"], per_task[f"{name}/tokens"] = n / t, t
                group = self.task_groups.get(name)
                if group is not None:
                    g = per_group.setdefault(group, [0.0, 0.0])
                    g[0], g[1] = g[0] + n, g[1] + t
        self.write(step, per_task, "task")
        self.write(
            step,
            {
                k: v
                for g, (n, t) in sorted(per_group.items())
                for k, v in ((f"{g}/loss", n / t), (f"{g}/tokens", t))
            },
            "task_cluster",
        )

    def write(self, step: int, values: Mapping[str, float], kind: str) -> None:
        """One record of `kind` (train, eval, zero_shot, ...) at `step`."""
        if not self.primary or not values:
            return
        values = {k: float(v) for k, v in values.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": int(step), "kind": kind, **values}) + "\n")
        tb = self._tb.get(kind)
        if tb is None:
            from tensorboardX import SummaryWriter

            tb = self._tb[kind] = SummaryWriter(os.path.join(self._tb_dir, kind))
        for name, value in values.items():
            tb.add_scalar(name, value, step)
        tb.flush()

    def close(self) -> None:
        for tb in self._tb.values():
            tb.close()
        if self._bar is not None:
            self._bar.close()


def truncate_jsonl(path: str, last_step: int) -> None:
    """Drops records after `last_step` (written past the checkpoint a run resumes from).

    A torn last line (disk full, unclean shutdown) is dropped too, with a warning.
    """
    if not os.path.exists(path):
        return
    records, lines, torn = _parse_jsonl(path)
    kept = [line for line, r in zip(lines, records) if r["step"] <= last_step]
    if len(kept) == len(lines) and not torn:
        return
    if torn:
        print(
            f"warning: {path}: dropped a torn last line ({torn[:60]!r}...), left by an "
            "unclean shutdown or a full disk",
            file=sys.stderr,
        )
    atomic.write_text(path, "".join(line if line.endswith("\n") else line + "\n" for line in kept))


def read_jsonl(path: str, kind: str = "train") -> list[dict]:
    """The records of one kind, in order (a torn last line is left out)."""
    records, _, _ = _parse_jsonl(path)
    return [r for r in records if r["kind"] == kind]


def _parse_jsonl(path: str) -> tuple[list[dict], list[str], str]:
    """(records, their lines, the torn last line or ''); a bad line elsewhere names the file."""
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [line for line in f if line.strip()]
    records, torn = [], ""
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
            record["step"], record["kind"]
        except (ValueError, TypeError, KeyError) as e:
            if number == len(lines) and not line.endswith("\n"):
                torn = line
                break
            raise ValueError(
                f"{path}, line {number}: not a metrics record ({e}); remove or fix that "
                "line, or move the file away (the run writes a new one)"
            ) from None
        records.append(record)
    return records, lines[: len(records)], torn
