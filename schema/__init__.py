"""bark_serve.schema: what a caller may ask, defined once (pydantic, no torch).

``request.SynthesisRequest`` (text or script, voice, options, format, priority), its parts
(``options``: Bark's knobs and the output options; ``fields``: voices, script lines, null handling),
the formats the encoders write (``formats``) and the checks of untrusted decoded data and the one
formatter of validation errors (``untrusted``). The HTTP models, batch items, dataset rows and the
CLI all take their rules from here.

Layer: right above ``stages`` (it uses the plain types of stages/types.py and stages/audio.py, which
import no torch), below ``cluster``. Enforced by import-linter (pyproject.toml).
"""
