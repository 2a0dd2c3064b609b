"""Fixtures for the data-side tests: tiny tokenizers and template variants, all offline.

The tokenizer is :func:`axolotl_mote.tiny.build_tiny_tokenizer` (a ChatML byte-level BPE
trained in well under a second) with the template's markers added the way the plugin
adds them, so no model is built and nothing touches the hub.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml


@pytest.fixture(scope="session")
def template_variant(tmp_path_factory):
    """``template_variant(base, **{key: {field: value}})``: a modified copy as a file.

    E.g. ``template_variant("aligncot", check={"mode": "train"})`` loads aligncot with
    the safety check trained. The copy goes through ``load_template`` like a user's
    file.
    """
    from axolotl_mote.templates import template_dir

    root = tmp_path_factory.mktemp("templates")
    counter = [0]

    def make(base: str, **changes):
        raw = yaml.safe_load((template_dir() / f"{base}.yaml").read_text())
        for stage in raw["stages"]:
            stage.update(changes.get(stage["key"], {}))
        counter[0] += 1
        path = Path(root) / f"{base}_{counter[0]}.yaml"
        path.write_text(yaml.safe_dump(raw))
        from axolotl_mote.templates import load_template

        return load_template(path)

    return make
