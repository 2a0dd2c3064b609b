"""Public sets of model replies with human refusal labels, read from your copies.

Each loader takes the path of a checkout (or the files themselves) of a public
repository and returns :class:`LabelledReply` rows with one binary label, ``refused``:
the reply did **not** fully do what was asked (it declined, rebutted, deflected, asked
for context instead of answering, or answered only in part). Only full compliance counts
as complying, as in XSTest's ``not_overrefuse`` and the project's ``compliance_rate``.
Rows whose human label is neither (a reply that misunderstood the prompt, say) are
left out and counted in :attr:`LabelledSet.excluded`. None of this data is in the
repository: pass your copies by path (docs/evaluation.md says where to get them).

============  ===========================================  ==========  ===============
set           source (repository, files)                   licence     replies used
============  ===========================================  ==========  ===============
``xstest``    paul-rottger/exaggerated-safety,             CC-BY-4.0   2,250
              ``model_completions/*.csv`` (Röttger et al.,
              NAACL 2024): 450 prompts × 5 models
``msts``      paul-rottger/msts-multimodal-safety,         CC-BY-4.0   see below
              ``data/response_annotations/english_*.csv``
              (Röttger et al., 2025, MSTS): English
              replies of 10 vision-language models
``rbr``       openai/safety-rbr-code-and-data,             MIT         518
              ``data/rbr_gold_data/{train,test}.jsonl``
              (Mu et al., 2024, Rule Based Rewards): the
              hand-labelled "RBR gold" completions
============  ===========================================  ==========  ===============

Label mappings (``SOURCE_LABEL -> refused``):

* ``xstest`` — ``final_label``: ``1_full_compliance`` → False;
  ``2_full_refusal``, ``3_partial_refusal`` → True.
* ``msts`` — ``final_taxonomy`` (the experts' adjudicated response category):
  ``1.1 rejection or rebuttal``, ``1.2 refusal only``, ``1.4 request for context /
  clarification`` → True; ``1.3 safety considerations / contexts``, ``2.1 explicit
  encouragement``, ``2.2 advice``, ``2.Z other (unsafe)`` → False; ``1.5 expression of
  uncertainty``, ``1.6 misunderstanding of prompt / image``, ``1.7 image description``,
  ``1.Z other (safe)`` → left out (neither a refusal nor an answer to the prompt). The
  text-only replies (``english_textonly.csv``) and the replies to image+text prompts
  (``english_multimodal.csv``, the image not needed to read the reply's stance) are
  subsets ``text`` and ``multimodal`` of one set: they share prompts' wording,
  annotators and models, so a scorer held out from one is held out from both.
* ``rbr`` — the human-labelled proposition ``fully_complies`` of the completion:
  True → False; False → True (``partially_complies`` replies are refusals here, as
  XSTest's partial refusals are). ``response_type`` is the *ideal* response to the
  prompt, not a label of the completion, and is not used.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

csv.field_size_limit(1 << 24)


@dataclass
class LabelledReply:
    set: str  # xstest | msts | rbr | own | ...
    subset: str  # the model (xstest), text/multimodal (msts), train/test (rbr)
    prompt: str  # the last user turn
    response: str
    refused: bool  # the human label, mapped (module docstring)
    source_label: str  # the label as the source spells it
    id: str = ""


@dataclass
class LabelledSet:
    name: str
    licence: str
    source: str
    rows: list[LabelledReply]
    excluded: dict[str, int] = field(default_factory=dict)  # source label -> rows

    def summary(self) -> dict:
        return {
            "n": len(self.rows),
            "refused": sum(r.refused for r in self.rows),
            "excluded": dict(self.excluded),
            "licence": self.licence,
            "source": self.source,
        }


def _files(paths: Iterable[str | Path], pattern: str, under: str) -> list[Path]:
    """The files matching ``pattern`` in each path (a file, a folder, or a repository
    checkout holding them under ``under``)."""
    out: list[Path] = []
    for path in map(Path, paths):
        if path.is_file():
            out.append(path)
        elif (path / under).is_dir():
            out += sorted((path / under).glob(pattern))
        elif path.is_dir():
            out += sorted(path.glob(pattern))
        else:
            raise FileNotFoundError(f"no such file or folder: {path}")
    if not out:
        raise FileNotFoundError(f"no {pattern} under {[str(p) for p in paths]}")
    return out


XSTEST_LABELS = {
    "1_full_compliance": False,
    "2_full_refusal": True,
    "3_partial_refusal": True,
}


def load_xstest(*paths: str | Path) -> LabelledSet:
    """XSTest v2's labelled completions (``model_completions/*.csv``)."""
    rows, excluded = [], {}
    for file in _files(paths, "xstest_v2_completions_*.csv", "model_completions"):
        model = file.stem.replace("xstest_v2_completions_", "")
        with open(file, encoding="utf-8", newline="") as handle:
            for row in csv.DictReader(handle):
                label = (row.get("final_label") or "").strip()
                if label not in XSTEST_LABELS or row.get("completion") is None:
                    excluded[label or "(none)"] = excluded.get(label or "(none)", 0) + 1
                    continue
                rows.append(
                    LabelledReply("xstest", model, row["prompt"], row["completion"],
                                  XSTEST_LABELS[label], label, f"{model}:{row['id']}")
                )  # fmt: skip
    return LabelledSet(
        "xstest",
        "CC-BY-4.0",
        "github.com/paul-rottger/exaggerated-safety model_completions/",
        rows,
        excluded,
    )


MSTS_REFUSED = ("1.1", "1.2", "1.4")
MSTS_COMPLIED = ("1.3", "2.1", "2.2", "2.Z")


def msts_label(taxonomy: str) -> bool | None:
    """MSTS ``final_taxonomy`` -> refused (None: left out)."""
    code = taxonomy.split(" ", 1)[0].strip()
    if code in MSTS_REFUSED:
        return True
    if code in MSTS_COMPLIED:
        return False
    return None


def load_msts(*paths: str | Path) -> LabelledSet:
    """MSTS's English response annotations (``english_textonly.csv`` and
    ``english_multimodal.csv``)."""
    rows, excluded = [], {}
    for file in _files(paths, "english_*.csv", "data/response_annotations"):
        subset = "text" if "text" in file.stem else "multimodal"
        with open(file, encoding="utf-8", newline="") as handle:
            for row in csv.DictReader(handle):
                taxonomy = (row.get("final_taxonomy") or "").strip()
                refused = msts_label(taxonomy)
                if refused is None or not row.get("response"):
                    key = taxonomy or "(none)"
                    excluded[key] = excluded.get(key, 0) + 1
                    continue
                rows.append(
                    LabelledReply("msts", subset, row["prompt_text"], row["response"],
                                  refused, taxonomy,
                                  f"{subset}:{row['model']}:{row['case_id']}")
                )  # fmt: skip
    return LabelledSet(
        "msts",
        "CC-BY-4.0",
        "github.com/paul-rottger/msts-multimodal-safety "
        "data/response_annotations/english_*.csv",
        rows,
        excluded,
    )


def load_rbr(*paths: str | Path) -> LabelledSet:
    """The RBR gold set (``data/rbr_gold_data/{train,test}.jsonl``)."""
    rows, excluded = [], {}
    for file in _files(paths, "*.jsonl", "data/rbr_gold_data"):
        for i, line in enumerate(file.read_text(encoding="utf-8").splitlines()):
            if not line.strip():
                continue
            rec = json.loads(line)
            full = (rec.get("propositions") or {}).get("fully_complies")
            completion = rec.get("completion") or []
            if not isinstance(full, bool) or not completion:
                excluded["(no fully_complies)"] = (
                    excluded.get("(no fully_complies)", 0) + 1
                )
                continue
            prompt = next(
                (m["content"] for m in reversed(rec["prompt"]) if m["role"] == "user"),
                "",
            )
            rows.append(
                LabelledReply("rbr", file.stem, prompt, completion[-1]["content"],
                              not full, f"fully_complies={full}", f"{file.stem}:{i}")
            )  # fmt: skip
    return LabelledSet(
        "rbr",
        "MIT",
        "github.com/openai/safety-rbr-code-and-data data/rbr_gold_data/",
        rows,
        excluded,
    )


def load_own(path: str | Path) -> LabelledSet:
    """Author-labelled replies (JSONL: ``prompt``, ``response``, ``refused``, and
    optionally ``id``, ``arm``, ``set``)."""
    rows = []
    for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            rec = json.loads(line)
            if not isinstance(rec.get("refused"), bool):
                raise ValueError(
                    f"{path} line {i} ({rec.get('id', '')}): `refused` must be true or "
                    "false (label every drawn reply before scoring)"
                )
            rows.append(
                LabelledReply("own", rec.get("arm", ""), rec.get("prompt", ""),
                              rec["response"], bool(rec["refused"]),
                              "refused" if rec["refused"] else "complied",
                              rec.get("id", ""))
            )  # fmt: skip
    return LabelledSet("own", "the project's", str(path), rows)


LOADERS: dict[str, Callable[..., LabelledSet]] = {
    "xstest": load_xstest,
    "msts": load_msts,
    "rbr": load_rbr,
    "own": load_own,
}


def load_labelled_set(spec: str) -> LabelledSet:
    """``name=path`` (``xstest``, ``msts``, ``rbr`` or ``own``)."""
    name, sep, path = spec.partition("=")
    if not sep or name not in LOADERS:
        raise ValueError(f"{spec!r}: use NAME=PATH with NAME in {sorted(LOADERS)}")
    return LOADERS[name](path)
