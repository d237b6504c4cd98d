"""The README's TRL-style Python snippet, executed: two imports switch a DPOTrainer user to chiPO.

The snippet is read from README.md between the ``api-snippet`` markers; only what cannot run offline is swapped
(the hub model for the tiny local Llama, the hub datasets for the local JSON-lines files, the output directory, a
two-step budget, an evaluation at every step and a small monitor sample). Everything else -- imports, config,
trainer construction from raw rows, train() -- runs as written.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _snippet() -> str:
    text = README.read_text()
    match = re.search(r"<!-- api-snippet -->\s*```python\n(.*?)```", text, flags=re.S)
    assert match, "README.md lost its api-snippet block"
    return match.group(1)


def test_readme_python_snippet_trains(tiny_dir, tmp_path):
    code = _snippet()
    swaps = {r'model_name = "[^"]+"': f'model_name = "{tiny_dir / "model"}"',
             r'load_dataset\("[^"]+", split="train"\)':
                 f'load_dataset("json", data_files="{tiny_dir / "train.jsonl"}", split="train")',
             r'load_dataset\("[^"]+", split="test"\)':
                 f'load_dataset("json", data_files="{tiny_dir / "test.jsonl"}", split="train")',
             r'eval_steps=\d+': "eval_steps=1, monitor_prompts=2, monitor_samples=2, monitor_max_new_tokens=4",
             r'output_dir="[^"]+"': f'output_dir="{tmp_path / "run"}", max_steps=2, logging_steps=1, '
                                    f'ref_cache_dir="{tmp_path / "cache"}", report_to="none"'}
    for pattern, replacement in swaps.items():
        code, n = re.subn(pattern, replacement.replace("\\", "\\\\"), code)
        assert n == 1, pattern
    namespace: dict = {}
    exec(compile(code, "README.md:api-snippet", "exec"), namespace)
    trainer = namespace["trainer"]
    assert trainer.state.global_step == 2
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses and all(math.isfinite(x) for x in losses)
    assert trainer.loss_name == "chipo" and trainer.beta == 0.05
    # Raw rows were tokenized and reference log-probs precomputed, as chipo train does.
    assert {"prompt_input_ids", "ref_chosen_logps"} <= set(trainer.train_dataset.column_names)
    # The monitor measured at each evaluation (steps 1 and 2) and logged its gold-free signals.
    measured = [h for h in trainer.state.log_history if "monitor/off_support" in h]
    assert len(measured) == 2 and all(math.isfinite(h["monitor/kl_k3"]) for h in measured)
