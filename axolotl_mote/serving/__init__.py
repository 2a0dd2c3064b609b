"""Serving MoTE models: an exact local server and a stage-switching path for
vLLM/SGLang.

``bundle`` writes what a per-request-adapter server needs, ``engine`` is what such a
server computes, ``client`` generates chains through one stage by stage, ``server`` is
``axolotl-mote serve`` (docs/serving.md).
"""
