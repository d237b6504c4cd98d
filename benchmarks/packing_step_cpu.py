"""Per-step work of the padded, bucketed and packed layouts, independent of other load on the machine.

    python benchmarks/packing_step_cpu.py [BATCHES]

Forward + backward of ``chipo.sequences.batch_sequence_logps`` (fused path) on the compute-config Llama
(vocab 512, hidden 256, 4 layers), batches of 16 pairs with vs_trl.py's length distribution (prompts 8-40
tokens, responses log-uniform 4-150, max_length 160). One torch thread and process CPU time per step, so time
spent waiting for other processes does not count; the layouts alternate batch by batch, two rounds.
"""

from __future__ import annotations

import math
import os
import random
import statistics
import sys
import time

import torch

from chipo.data import PreferenceCollator
from chipo.markdown import markdown_table
from chipo.sequences import batch_sequence_logps
from chipo.toy import build_tiny_llama

VARIANTS = {"padded": {}, "buckets4": {"max_buckets": 4}, "packed": {"packed": True},
            "packed one row": {"packed": True, "pack_tokens": 10**6}}


def main() -> None:
    n_batches = int(sys.argv[1]) if len(sys.argv) > 1 else 8
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = build_tiny_llama(512, hidden_size=256, num_layers=4, num_heads=4, intermediate_size=640, pad_token_id=0)
    rng = random.Random(0)

    def length(lp: int) -> int:  # response + EOS, cut to max_length 160
        return min(int(round(math.exp(rng.uniform(math.log(4), math.log(150))))), 160 - lp - 1) + 1

    def tokens(n: int) -> list[int]:
        return [rng.randint(4, 511) for _ in range(n)]

    def feature(i: int) -> dict:
        lp = rng.randint(8, 40)
        lc, lr = length(lp), length(lp)
        return {"prompt_input_ids": tokens(lp), "chosen_input_ids": tokens(lc), "rejected_input_ids": tokens(lr),
                "row": i}

    collate = PreferenceCollator(pad_token_id=0)
    batches = [collate([feature(16 * j + i) for i in range(16)]) for j in range(n_batches)]

    def step(kwargs: dict, batch: dict) -> None:
        model.zero_grad(set_to_none=True)
        batch_sequence_logps(model, batch, "fused", **kwargs).sum().backward()

    for kwargs in VARIANTS.values():
        step(kwargs, batches[0])  # warm-up
    times: dict[str, list[float]] = {k: [] for k in VARIANTS}
    for _ in range(2):
        for batch in batches:
            for name, kwargs in VARIANTS.items():
                t = time.process_time()
                step(kwargs, batch)
                times[name].append(time.process_time() - t)
    print(markdown_table(["layout", "total CPU s", "median step", "median / padded, same batch"], [
        [name, f"{sum(ts):.2f}", f"{statistics.median(ts):.3f}",
         f"{statistics.median(t / p for t, p in zip(ts, times['padded'])):.2f}"] for name, ts in times.items()]))
    print(f"load average: {os.getloadavg()}")


if __name__ == "__main__":
    main()
