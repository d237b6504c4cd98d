"""chipo: language-model post-training that does not overoptimize.

Layers (imports point down only; an import-linter contract in pyproject.toml):

1. components: ``divergences``, ``losses``, ``logprobs``, ``sequences``, ``data``, ``rewards``, ``generation``,
   ``judges``, ``inference``, ``stats``, ``models``, ``io``, ``config``, ``toy``;
2. trainers: ``train`` (preference, sft, reward, rl, online; configs subclass ``TrainingArguments``);
3. the lab (``lab``) and the exact tabular testbed (``bandit``);
4. recipes: ``recipes.tldr``;
5. the command line: ``cli``.
"""

__version__ = "0.1.0"
