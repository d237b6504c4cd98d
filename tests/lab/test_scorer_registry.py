"""The lab's scorers are found by name through the ``chipo.scorers`` entry point: ``load_scorer("world:DIR")`` and
``load_scorer("world-scaled:SCALE:DIR")`` work in a fresh interpreter that imported only ``chipo.rewards``, and the
lookup itself imports nothing of the lab until a lab scorer is asked for."""

import json
import subprocess
import sys

import numpy as np

from chipo.lab.language import world_scorer

CHILD = """
import json, sys
from chipo.rewards import load_scorer, registered_scorers
names = registered_scorers()
lab_after_listing = any(m.startswith("chipo.lab") for m in sys.modules)
world_dir, prompts, responses = json.loads(sys.argv[1])
gold = load_scorer("world:" + world_dir)
scaled = load_scorer("world-scaled:2.5:" + world_dir)
print(json.dumps({"names": sorted(names), "lab_after_listing": lab_after_listing, "gold_name": gold.name,
                  "gold": gold.score(prompts, responses).tolist(),
                  "scaled": scaled.score(prompts, responses).tolist()}))
"""


def test_world_scorers_resolve_in_a_fresh_interpreter(tiny_world):
    rows = [json.loads(line) for line in (tiny_world / "prompts_eval.jsonl").read_text().splitlines()[:3]]
    prompts = [r["prompt"] for r in rows]
    responses = [r["reference"] for r in rows]
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps([str(tiny_world), prompts, responses])],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    child = json.loads(done.stdout.strip().splitlines()[-1])
    assert {"world", "world-scaled"} <= set(child["names"]) and not child["lab_after_listing"]
    expected = world_scorer(str(tiny_world)).score(prompts, responses)
    assert child["gold_name"] == "world"
    np.testing.assert_array_equal(child["gold"], expected)
    np.testing.assert_allclose(child["scaled"], 2.5 * expected, rtol=1e-12)
    assert expected.std() > 0 or expected.any()  # the rows are scored, not all zero by accident
