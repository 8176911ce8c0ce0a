"""bark_serve.stages: Bark's four stages in pure PyTorch (no Ray, no Redis, no HTTP).

What lives here: the engines (semantic, coarse, fine, codec) behind one
``StageEngine`` interface, the token arithmetic (tokens.py) and Bark's named
constants (constants.py), the models with their slot KV cache (modeling.py),
text, voices, long-form splitting and the one planner of a request (plan.py),
checkpoint loading and the in-process pipeline.

Layer: the bottom. It may import only third-party packages (torch,
transformers, numpy, ...), never another ``bark_serve`` package. Enforced by
import-linter (``[tool.importlinter]`` in pyproject.toml, run by .ci/run).
"""
