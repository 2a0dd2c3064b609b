"""A one-off measurement: a linear probe on SmolLM2-135M's hidden states (prompt in
context) as a refusal scorer, against the n-gram ``learned`` recipe on the same rows
(docs/evaluation.md, "Where `learned` misses"). Not shipped: it did not beat the n-gram
model. Paths come from the environment (defaults: this session's machine):

    PROBE_DATA=DIR  (xstest/, msts/, rbr/ checkouts; smollm2/ model; output .npz)
    PROBE_XSTEST_PROMPTS=xstest_prompts.csv   (ids of the authors' sample -> prompts)
    python benchmarks/refusal_probe.py extract probe_sub300.npz 300   # ~7 min, 2 cores
    python benchmarks/refusal_probe.py fit probe_sub300.npz 300       # the table
"""

import csv
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from axolotl_mote.evaluation.labelled_sets import (
    load_msts,
    load_own,
    load_rbr,
    load_xstest,
)
from benchmarks.scorer_agreement import rates

D = Path(os.environ.get("PROBE_DATA", "/work/scorer-data"))
REPO = Path(__file__).resolve().parents[1]
OWN = REPO / "data" / "labels" / "labelled_replies_smollm2.jsonl"
MODEL = D / "smollm2"
OUT = D / (sys.argv[2] if len(sys.argv) > 2 else "probe_feats.npz")
PROMPT_TOK, REPLY_TOK = 48, 64


def rows():
    sets = {
        "xstest": load_xstest(D / "xstest"),
        "msts": load_msts(D / "msts"),
        "rbr": load_rbr(D / "rbr"),
        "own": load_own(OWN),
    }
    prompts = {}
    with open(
        os.environ.get(
            "PROBE_XSTEST_PROMPTS",
            REPO.parent / "shared/data/xstest/xstest_prompts.csv",
        ),
        newline="",
    ) as f:
        for r in csv.DictReader(f):
            prompts[r["id"]] = r["prompt"]
    own_ids = [json.loads(line) for line in open(OWN)]
    for r, rec in zip(sets["own"].rows, own_ids):
        r.prompt = prompts.get(str(rec.get("prompt_id")), "")
    out = []
    for name, s in sets.items():
        for r in s.rows:
            out.append((name, r.subset, r.prompt or "", r.response or "", r.refused))
    return out


def select(data, limit):
    if not limit:
        return data
    rng = np.random.default_rng(0)
    keep = []
    for name in ("xstest", "msts", "rbr", "own"):
        idx = [i for i, d in enumerate(data) if d[0] == name]
        if name in ("xstest", "msts") and len(idx) > limit:
            idx = sorted(rng.choice(idx, limit, replace=False))
        keep += list(idx)
    return [data[i] for i in keep]


def extract(limit=None):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(MODEL)
    model = AutoModelForCausalLM.from_pretrained(
        MODEL, torch_dtype=torch.float32
    ).eval()
    data = rows()
    data = select(data, limit)
    t0 = time.time()
    # sort by length for padding efficiency
    enc = []
    for _name, _sub, prompt, reply, _y in data:
        p = tok(prompt, add_special_tokens=False)["input_ids"][:PROMPT_TOK]
        head = tok.apply_chat_template(
            [{"role": "user", "content": tok.decode(p)}],
            add_generation_prompt=True,
            tokenize=False,
        )
        h = tok(head, add_special_tokens=False)["input_ids"]
        r = tok(reply, add_special_tokens=False)["input_ids"][:REPLY_TOK] or [
            tok.eos_token_id
        ]
        enc.append((h, r))
    order = np.argsort([len(h) + len(r) for h, r in enc])
    res = [None] * len(enc)
    B = 32
    layers = None
    with torch.no_grad():
        for s in range(0, len(order), B):
            idx = order[s : s + B]
            seqs = [enc[i][0] + enc[i][1] for i in idx]
            L = max(map(len, seqs))
            ids = torch.full((len(seqs), L), tok.pad_token_id or 0)
            att = torch.zeros((len(seqs), L), dtype=torch.long)
            for j, q in enumerate(seqs):  # right padding
                ids[j, : len(q)] = torch.tensor(q)
                att[j, : len(q)] = 1
            out = model(input_ids=ids, attention_mask=att, output_hidden_states=True)
            hs = out.hidden_states
            if layers is None:
                n = len(hs) - 1
                layers = [n // 3, n // 2, 2 * n // 3, n]
            for j, i in enumerate(idx):
                a, b = len(enc[i][0]), len(enc[i][0]) + len(enc[i][1])
                vec = []
                for layer in layers:
                    x = hs[layer][j]
                    vec += [x[a:b].mean(0), x[a : min(b, a + 8)].mean(0), x[b - 1]]
                res[i] = torch.cat(vec).numpy().astype(np.float32)
            if s % (B * 20) == 0:
                print(f"{s}/{len(order)} {time.time() - t0:.0f}s", flush=True)
    X = np.stack(res)
    meta = np.array([(d[0], d[1]) for d in data])
    y = np.array([d[4] for d in data])
    np.savez_compressed(OUT, X=X, meta=meta, y=y, layers=np.array(layers))
    print(f"done {len(data)} in {time.time() - t0:.0f}s")


PUBLIC = ("xstest", "msts", "rbr")


def leave_one_set_out(sets, y, fit_predict, label: str) -> None:
    """Fit on the public sets but one, report on that one (and on the authors'
    sample, never fitted on): ``fit_predict(train_mask, test_mask) -> predictions``.
    The figures come from the protocol's own ``rates``, as in scorer_agreement."""
    for held in PUBLIC + ("own",):
        train = np.isin(sets, [s for s in PUBLIC if s != held])
        test = sets == held
        r = rates([bool(v) for v in fit_predict(train, test)], list(y[test]))
        print(
            f"{label} held={held:7s} n={r['n']:5d} agree={r['agreement']:.3f} "
            f"R={r['recall']:.3f} P={r['precision']:.3f}"
        )


def fit(limit=None):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from axolotl_mote.evaluation.learned import LearnedRefusalScorer

    z = np.load(OUT)
    X, meta, y = z["X"], z["meta"], z["y"]
    data = select(rows(), limit)
    assert [d[0] for d in data] == list(meta[:, 0]) and [d[4] for d in data] == list(y)
    texts = np.array([d[3] for d in data], dtype=object)
    sets = meta[:, 0]

    def ngram(train, test):
        scorer = LearnedRefusalScorer.fit(list(texts[train]), list(y[train]))
        return scorer.refused(list(texts[test]))

    leave_one_set_out(sets, y, ngram, "ngram")
    for C in (0.01, 0.1):

        def probe(train, test, C=C):
            sc = StandardScaler().fit(X[train])
            clf = LogisticRegression(C=C, max_iter=2000, class_weight="balanced")
            clf.fit(sc.transform(X[train]), y[train])
            return clf.predict(sc.transform(X[test]))

        leave_one_set_out(sets, y, probe, f"C={C}")


if __name__ == "__main__":
    if sys.argv[1] == "extract":
        extract(int(sys.argv[3]) if len(sys.argv) > 3 else None)
    else:
        fit(int(sys.argv[3]) if len(sys.argv) > 3 else None)
