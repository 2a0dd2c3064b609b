"""``generate_data``: seed questions in, chain records out, resumable.

Records are appended to the output JSONL as each batch finishes (flushed and fsynced);
rejected questions (malformed output, or unsafe after the full chain with
``on_fail="drop"``) go to the rejects file with their reason. A rerun with the same
arguments skips every id already in either file, so an interrupted run continues where
it stopped: nothing is generated twice, nothing is lost. A line cut off by a kill
mid-write is detected and removed before resuming. The summary (``<output
stem>.report.json``) is recounted from both files, so it covers all runs together.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from axolotl_mote.data.schema import ChainRecordError, iter_jsonl, parse_chain
from axolotl_mote.datagen.backends import TextGenerator
from axolotl_mote.datagen.chain_rule import ChainRule, Outcome, Seed
from axolotl_mote.templates import PromptTemplate, load_template


@dataclass
class DatagenReport:
    """Counts for this run and for the output as a whole."""

    output: str
    rejects: str
    skipped_done: int  # ids found in the output/rejects files and not redone
    this_run: dict[str, int] = field(default_factory=dict)  # status -> count, this run
    total: dict[str, int] = field(default_factory=dict)  # status -> count, both files
    verdict_paths: dict[str, int] = field(
        default_factory=dict
    )  # "unsafe>safe" -> count
    malformed_reasons: dict[str, int] = field(default_factory=dict)
    # kept chains by their stages ("analysis>answer" -> count) and by who checked them
    stage_plans: dict[str, int] = field(default_factory=dict)
    checkers: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def default_paths(output: str | Path) -> tuple[Path, Path]:
    """``chains.jsonl`` -> (``chains.rejects.jsonl``, ``chains.report.json``)."""
    output = Path(output)
    stem = output.name[: -len(output.suffix)] if output.suffix else output.name
    return output.with_name(f"{stem}.rejects.jsonl"), output.with_name(
        f"{stem}.report.json"
    )


def load_seeds(
    path: str | Path,
    template: PromptTemplate,
    *,
    prompt_field: str | None = None,
    split: str = "train",
    limit: int | None = None,
) -> list[Seed]:
    """Seed questions from a JSONL file or a ``datasets`` folder (``save_to_disk``).

    Each row needs ``prompt`` or ``messages`` (multi-turn, ending with the user turn);
    ``prompt_field`` names another column holding the question. ``id`` is kept, or made
    from a hash of the conversation. Other columns go to ``meta``. Ids must be unique:
    they are what resuming skips.
    """
    path = Path(path)
    if path.is_dir():
        import datasets

        data = datasets.load_from_disk(str(path))
        if isinstance(data, datasets.DatasetDict):
            data = data[split]
        rows: Iterable[tuple[str, Any]] = (
            (f"{path} row {i}", r) for i, r in enumerate(data)
        )
    else:
        rows = ((f"{path}:{n}", r) for n, r in iter_jsonl(path))
    seeds: list[Seed] = []
    seen: dict[str, str] = {}
    for where, row in rows:
        if limit is not None and len(seeds) >= limit:
            break
        if isinstance(row, str):
            row = {"prompt": row}
        row = {k: v for k, v in dict(row).items() if v is not None}
        if prompt_field:
            if prompt_field not in row:
                raise ValueError(
                    f"{where}: no column {prompt_field!r} (--prompt-field)"
                )
            row["prompt"] = row.pop(prompt_field)
        probe = {k: row[k] for k in ("id", "prompt", "messages") if k in row}
        probe[template.stage(template.answer_stage).key] = "-"
        try:
            chain = parse_chain(probe, template, location=where)
        except ChainRecordError as err:
            raise ValueError(str(err).replace("record", "seed question", 1)) from err
        meta = dict(row.get("meta") or {})
        meta.update(
            {
                k: v
                for k, v in row.items()
                if k not in ("id", "prompt", "messages", "meta")
            }
        )
        sid = (
            chain.id
            or "q-"
            + hashlib.sha1(
                json.dumps(chain.messages, sort_keys=True).encode()
            ).hexdigest()[:12]
        )
        if sid in seen:
            raise ValueError(
                f"{where}: duplicate id {sid!r} (first at {seen[sid]}); ids "
                "must be unique so an interrupted run can resume"
            )
        seen[sid] = where
        seeds.append(Seed(sid, chain.messages, meta))
    return seeds


def done_ids(path: Path) -> list[str]:
    """Ids already written to ``path``; a last line cut off mid-write is removed."""
    if not path.exists():
        return []
    raw = path.read_bytes()
    keep = len(raw)
    if raw and not raw.endswith(b"\n"):
        keep = raw.rfind(b"\n") + 1  # an interrupted write: drop the partial line
    ids = []
    for number, line in enumerate(raw[:keep].decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            ids.append(str(json.loads(line)["id"]))
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(
                f"{path}:{number}: not a record with an id ({err}); fix or "
                "remove the line before resuming"
            ) from err
    if keep != len(raw):
        with open(path, "r+b") as handle:
            handle.truncate(keep)
    return ids


def generate_data(
    generator: TextGenerator,
    seeds: list[Seed],
    output: str | Path,
    *,
    template: PromptTemplate | str = "aligncot",
    batch_size: int = 8,
    max_new_tokens: int = 256,
    check_max_new_tokens: int = 64,
    seed: int = 0,
    on_fail: str = "keep",
    rejects: str | Path | None = None,
    progress: bool = True,
    checker: TextGenerator | None = None,
) -> DatagenReport:
    """Run the check-then-extend rule over ``seeds``, appending to ``output``.

    ``checker``: a separate model for the safety checks (default: ``generator``, the
    paper's self-check); each chain records which one checked it.
    """
    from tqdm import tqdm

    tmpl = load_template(template) if isinstance(template, str) else template
    rule = ChainRule(
        tmpl,
        on_fail=on_fail,
        max_new_tokens=max_new_tokens,
        check_max_new_tokens=check_max_new_tokens,
        seed=seed,
    )
    output = Path(output)
    default_rejects, report_path = default_paths(output)
    rejects = Path(rejects) if rejects else default_rejects
    output.parent.mkdir(parents=True, exist_ok=True)
    done = set(done_ids(output)) | set(done_ids(rejects))
    todo = [s for s in seeds if s.id not in done]
    report = DatagenReport(str(output), str(rejects), len(seeds) - len(todo))
    counts: Counter[str] = Counter()
    with (
        open(output, "a", encoding="utf-8") as out,
        open(rejects, "a", encoding="utf-8") as rej,
        tqdm(
            total=len(seeds),
            initial=len(seeds) - len(todo),
            desc="generate-data",
            unit="question",
            disable=not progress,
        ) as bar,
    ):
        for start in range(0, len(todo), batch_size):
            outcomes = rule.run(generator, todo[start : start + batch_size], checker)
            for outcome in outcomes:
                counts[outcome.status] += 1
                if outcome.record is not None:
                    out.write(json.dumps(outcome.record, ensure_ascii=False) + "\n")
                else:
                    rej.write(
                        json.dumps(_reject_row(outcome), ensure_ascii=False) + "\n"
                    )
            for handle in (out, rej):
                handle.flush()
                os.fsync(handle.fileno())
            bar.update(len(outcomes))
            bar.set_postfix(
                kept=counts["passed"] + counts["failed_kept"] + counts["failed_marked"],
                malformed=counts["malformed"],
            )
    report.this_run = dict(counts)
    _recount(report, output, rejects)
    report_path.write_text(
        json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8"
    )
    return report


def _reject_row(outcome: Outcome) -> dict[str, Any]:
    return {
        "id": outcome.id,
        "status": outcome.status,
        "reason": outcome.reason,
        "verdicts": outcome.verdicts,
        "texts": outcome.texts,
    }


def _recount(report: DatagenReport, output: Path, rejects: Path) -> None:
    total: Counter[str] = Counter()
    paths: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    plans: Counter[str] = Counter()
    checkers: Counter[str] = Counter()
    for path, is_output in ((output, True), (rejects, False)):
        if not path.exists():
            continue
        for _, row in iter_jsonl(path):
            info = row.get("meta", {}).get("datagen", {}) if is_output else row
            status = info.get("status", "unknown")
            total[status] += 1
            if info.get("verdicts"):
                paths[">".join(info["verdicts"])] += 1
            if status == "malformed":
                reasons[_reason_kind(row.get("reason", ""))] += 1
            if is_output:
                plans[">".join(info.get("stages") or ["?"])] += 1
                checkers[str(info.get("checker", "self (not recorded)"))] += 1
    report.total, report.verdict_paths = dict(total), dict(paths)
    report.malformed_reasons = dict(reasons)
    report.stage_plans, report.checkers = dict(plans), dict(checkers)


def _reason_kind(reason: str) -> str:
    for kind in ("empty text", "unparseable check verdict", "stage marker"):
        if kind in reason:
            return kind
    return "invalid record"
