"""The reward-model audit: how well the run's reward model judges, measured where the truth is known.

In the recipe the reward model alone decides every instruction-following prompt's SFT answer and
DPO pair; math and code answers are first gated by their checkers. A reward model that cannot tell
right from wrong therefore fills the instruction sets with wrong answers, and nothing else in the
pipeline shows it. The audit, computed on every build, measures it.

Truth per response, where a checker knows it: math `correct` is right, `incorrect`/`unparseable`
wrong; code `pass` right, `fail`/`timeout` wrong (the build's own rules, `fusechat.tables.RIGHT` and
`WRONG`); a prompt whose meta carries one exact answer (`expected`, the demo world's instruction and
Chinese rows) is judged by `fusechat.scoring.checks.exact_answer`. Everything else is unknown and
takes no part in the judged figures.

Per domain and per source (source `all`: the responses of all sources to one prompt compete, as
for the SFT winner; one source: its own samples compete, as for a DPO pair):
- `pairwise_accuracy`: over every (right, wrong) pair of scored responses to one prompt, the share
  where the right one has the higher reward, ties counting half (the Mann-Whitney statistic);
- `top1_right`: over prompts with both right and wrong responses ("competing"), the share where the
  highest-rewarded response is right (a tie at the top counts the right share of the tied ones);
  `chance`: what a random pick among the prompt's judged responses would give;
- `sft_right`, `dpo_chosen_right`, `dpo_rejected_right`: of the rows the build selected (source
  `all`: every row; one source: the rows whose `source_model` it is), how many are right, out of
  the rows whose truth is known.

Everywhere: the reward distribution per domain and source, the reward's correlation with response
length (completion tokens; Pearson and Spearman), and the length of DPO chosen against rejected
responses (the known length bias of reward models).

Warning: in a domain the reward model decides (no checker gates it: not math or code), a
pairwise accuracy at or below 0.5 + CHANCE_MARGIN, or a top-1 pick at or below chance +
CHANCE_MARGIN, is a reward model at chance. The margin keeps a model that is a hair over a
coin flip on a few hundred pairs from passing as a judge.

Everything is grouped with pandas/NumPy on whole columns: the published recipe holds ~4 million
responses.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

from fusechat.tables import DECISIONS, PROMPTS, RESPONSES, RIGHT, SCORES, WRONG, read

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd
    import pyarrow as pa

ALL = "all"
CHANCE_MARGIN = 0.05
AUDIT_FILE = "audit.json"  # in datasets/, beside report.md: the cards and the eval outputs read it
PLOT_FILE = "reward_audit.png"
JUDGED_COLUMNS = ("domain", "source", "decided_by", "prompts", "prompts_right", "competing", "pairs",
                  "pairwise_accuracy", "top1_right", "chance", "sft_rows", "sft_right", "sft_known",
                  "dpo_pairs", "dpo_chosen_right", "dpo_rejected_right", "dpo_known")


# -- truth --------------------------------------------------------------------------------------
def expected_answers(prompts: pa.Table) -> dict[str, str]:
    """prompt_id -> exact answer, for the prompts whose meta carries `expected`. Only metas that
    mention the key are parsed (none in a run on the published data sets)."""
    import pyarrow.compute as pc

    meta = prompts.column("meta")
    has = pc.fill_null(pc.match_substring(meta, '"expected"'), False)
    subset = prompts.filter(has).select(["prompt_id", "meta"]).to_pylist()
    out = {}
    for row in subset:
        try:
            value = json.loads(row["meta"]).get("expected")
        except (json.JSONDecodeError, AttributeError):
            continue
        if isinstance(value, str):
            out[row["prompt_id"]] = value
    return out


def normalized(texts: pa.Array) -> pa.Array:
    """`exact_answer`'s normalisation on a whole column: whitespace runs collapsed, ends stripped
    (Arrow's Unicode whitespace is Python's str.split() whitespace)."""
    import pyarrow.compute as pc

    return pc.binary_join(pc.utf8_split_whitespace(pc.utf8_trim_whitespace(texts)), " ")


def truth_of(domain: np.ndarray, status: np.ndarray, exact: np.ndarray) -> np.ndarray:
    """1.0 right, 0.0 wrong, NaN unknown, per response. `exact`: the exact check's verdict (1/0),
    NaN where the prompt carries no exact answer."""
    import numpy as np

    truth = np.array(exact, dtype=np.float64, copy=True)
    for dom in RIGHT:  # the math and code domains get the check of their name
        in_dom = domain == dom
        truth[in_dom & np.isin(status, RIGHT[dom])] = 1.0
        truth[in_dom & np.isin(status, WRONG[dom])] = 0.0
    return truth


def response_frame(prompts: pa.Table, scores: pa.Table, responses: pa.Table) -> pd.DataFrame:
    """One row per scored response: prompt_id, domain, source, reward (NaN = none), length
    (completion tokens), truth (1 right, 0 wrong, NaN unknown)."""
    import numpy as np
    import pandas as pd
    import pyarrow as pa
    import pyarrow.compute as pc

    s = scores.select(["response_id", "prompt_id", "source", "domain", "reward", "check_status"])
    idx = pc.index_in(s.column("response_id"), value_set=responses.column("response_id").combine_chunks())
    tokens = responses.column("completion_tokens").combine_chunks()
    length = pc.take(tokens, idx).cast(pa.float64()).to_numpy(zero_copy_only=False)
    exact = np.full(s.num_rows, np.nan)
    answers = expected_answers(prompts)
    if answers:
        pid = s.column("prompt_id").combine_chunks()
        keys = pa.array(list(answers), pa.string())
        where = pc.index_in(pid, value_set=keys)
        rows = np.flatnonzero(~pc.is_null(where).to_numpy(zero_copy_only=False))
        texts = pc.take(responses.column("text").combine_chunks(), pc.take(idx, pa.array(rows)))
        want = pc.take(pa.array(list(answers.values()), pa.string()), pc.take(where, pa.array(rows)))
        same = pc.fill_null(pc.equal(normalized(pc.fill_null(texts.cast(pa.string()), "")), want), False)
        exact[rows] = same.to_numpy(zero_copy_only=False).astype(np.float64)
    domain = s.column("domain").to_numpy(zero_copy_only=False).astype(object)
    status = s.column("check_status").to_numpy(zero_copy_only=False).astype(object)
    return pd.DataFrame({
        "response_id": s.column("response_id").to_pandas(),
        "prompt_id": s.column("prompt_id").to_pandas(),
        "domain": domain, "source": s.column("source").to_pandas(),
        "reward": s.column("reward").cast(pa.float64()).to_numpy(zero_copy_only=False),
        "length": length, "truth": truth_of(domain, status, exact),
    })


# -- judged figures -----------------------------------------------------------------------------
def judged_by(frame: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """Pairwise accuracy, top-1 pick and chance per `by` (prompts compete within `by` + prompt)."""
    import numpy as np

    f = frame[~np.isnan(frame["truth"].to_numpy()) & ~np.isnan(frame["reward"].to_numpy())]
    keys = [*by, "prompt_id"]
    right = f["truth"].to_numpy() == 1.0
    g = f.assign(right=right.astype(np.float64), wrong=(~right).astype(np.float64))
    g["rank"] = g.groupby(keys, sort=False)["reward"].rank(method="average")
    top = g.groupby(keys, sort=False)["reward"].transform("max").to_numpy() == g["reward"].to_numpy()
    g["top"] = top.astype(np.float64)
    g["top_right"] = (top & right).astype(np.float64)
    g["right_rank"] = g["rank"] * g["right"]
    per = g.groupby(keys, sort=True)[["right", "wrong", "right_rank", "top", "top_right"]].sum()
    n_r, n_w = per["right"], per["wrong"]
    per["u"] = per["right_rank"] - n_r * (n_r + 1) / 2  # right-over-wrong wins, ties half
    per["pairs"] = n_r * n_w
    per["competing"] = ((n_r > 0) & (n_w > 0)).astype(np.float64)
    per["has_right"] = (n_r > 0).astype(np.float64)
    per["top1"] = np.where(per["competing"] > 0, per["top_right"] / per["top"], 0.0)
    per["chance"] = np.where(per["competing"] > 0, n_r / (n_r + n_w), 0.0)
    agg = per.groupby(level=list(range(len(by))), sort=True).agg(
        prompts=("right", "size"), prompts_right=("has_right", "sum"), competing=("competing", "sum"),
        pairs=("pairs", "sum"), u=("u", "sum"), top1=("top1", "sum"), chance=("chance", "sum"))
    comp = agg["competing"].to_numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        agg["pairwise_accuracy"] = np.where(agg["pairs"] > 0, agg["u"] / agg["pairs"], np.nan)
        agg["top1_right"] = np.where(comp > 0, agg["top1"] / comp, np.nan)
        agg["chance"] = np.where(comp > 0, agg["chance"] / comp, np.nan)
    agg[["prompts_right", "competing", "pairs"]] = agg[["prompts_right", "competing", "pairs"]].astype("int64")
    return agg.drop(columns=["u", "top1"]).reset_index()


def _selected(frame: pd.DataFrame, decisions: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """Per `by`: SFT rows and DPO pairs, how many right, out of how many with a known truth."""
    import numpy as np
    import pandas as pd

    truth = pd.Series(frame["truth"].to_numpy(), index=frame["response_id"].to_numpy())
    truth = truth[~truth.index.duplicated()]
    d = decisions.rename(columns={"source_model": "source"})
    chosen = truth.reindex(d["chosen_response_id"].to_numpy()).to_numpy()
    rejected = truth.reindex(d["rejected_response_id"].to_numpy()).to_numpy()
    sft, dpo = (d["assigned"] == "sft").to_numpy(), (d["assigned"] == "dpo").to_numpy()
    known = dpo & ~np.isnan(chosen) & ~np.isnan(rejected)
    cols = pd.DataFrame({
        "sft_rows": sft, "sft_right": sft & (chosen == 1.0), "sft_known": sft & ~np.isnan(chosen),
        "dpo_pairs": dpo, "dpo_chosen_right": known & (chosen == 1.0),
        "dpo_rejected_right": known & (rejected == 1.0), "dpo_known": known,
    }).astype(np.int64)
    for c in by:
        cols[c] = d[c].to_numpy()
    return cols.groupby(by, sort=True).sum().reset_index()


def judged_table(frame: pd.DataFrame, decisions: pd.DataFrame) -> pd.DataFrame:
    """The judged figures per domain, for all sources together and for each source."""
    import pandas as pd

    parts = []
    for by in (["domain"], ["domain", "source"]):
        j = judged_by(frame, by)
        s = _selected(frame, decisions, by)
        t = j.merge(s, on=by, how="outer")
        if by == ["domain"]:
            t.insert(1, "source", ALL)
        parts.append(t)
    t = pd.concat(parts, ignore_index=True)
    t = t[t["prompts"].fillna(0) > 0].copy()  # only where a checker knows the truth
    t.insert(2, "decided_by", ["checker" if d in RIGHT else "reward model" for d in t["domain"]])
    for c in ("prompts", "prompts_right", "competing", "pairs", "sft_rows", "sft_right", "sft_known",
              "dpo_pairs", "dpo_chosen_right", "dpo_rejected_right", "dpo_known"):
        t[c] = t[c].fillna(0).astype("int64")
    t["order"] = (t["source"] != ALL).astype(int)
    t = t.sort_values(["domain", "order", "source"], kind="stable").drop(columns="order")
    return t[list(JUDGED_COLUMNS)].reset_index(drop=True)


def warnings_of(judged: pd.DataFrame) -> list[str]:
    """One line per domain where the reward model decides the data and judges at chance or worse."""
    out = []
    rows = judged[(judged["source"] == ALL) & (judged["decided_by"] == "reward model") & (judged["competing"] > 0)]
    for r in rows.itertuples(index=False):
        pw, top, chance = r.pairwise_accuracy, r.top1_right, r.chance
        if pw <= 0.5 + CHANCE_MARGIN or top <= chance + CHANCE_MARGIN:
            out.append(
                f"reward model at chance on {r.domain}, where it decides the data: pairwise accuracy "
                f"{pw:.2f} on {r.pairs} right-vs-wrong pairs (chance 0.50), top-1 pick right {top:.0%} "
                f"against {chance:.0%} by chance on {r.competing} prompts; {r.sft_right} of {r.sft_rows} "
                f"SFT rows are right")
    return out


# -- everywhere ---------------------------------------------------------------------------------
def _both_levels(frame: pd.DataFrame) -> list[tuple[pd.DataFrame, list[str]]]:
    return [(frame.assign(source=ALL), ["domain", "source"]), (frame, ["domain", "source"])]


def reward_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Reward distribution and its correlation with length, per domain and source."""
    import numpy as np
    import pandas as pd

    f = frame[~np.isnan(frame["reward"].to_numpy())]
    f = f[~np.isnan(f["length"].to_numpy())]
    out = []
    for g, by in _both_levels(f):
        q = g.groupby(by, sort=True)["reward"]
        t = pd.DataFrame({"n": q.size(), "mean": q.mean(), "std": q.std(), "min": q.min(),
                          "p25": q.quantile(0.25), "median": q.median(), "p75": q.quantile(0.75),
                          "max": q.max()})
        t["length_pearson"] = _grouped_pearson(g, by, "reward", "length")
        ranked = g.assign(reward=g.groupby(by)["reward"].rank(), length=g.groupby(by)["length"].rank())
        t["length_spearman"] = _grouped_pearson(ranked, by, "reward", "length")
        out.append(t.reset_index())
    t = pd.concat(out, ignore_index=True)
    t["order"] = (t["source"] != ALL).astype(int)
    return t.sort_values(["domain", "order", "source"], kind="stable").drop(columns="order").reset_index(drop=True)


def _grouped_pearson(g: pd.DataFrame, by: list[str], x: str, y: str) -> pd.Series:
    """Pearson correlation of two columns per group, from grouped sums (NaN where either is constant)."""
    import numpy as np

    t = g.assign(_xy=g[x] * g[y], _xx=g[x] * g[x], _yy=g[y] * g[y]).groupby(by, sort=True)
    m = t[[x, y, "_xy", "_xx", "_yy"]].mean()
    cov = m["_xy"] - m[x] * m[y]
    vx, vy = m["_xx"] - m[x] ** 2, m["_yy"] - m[y] ** 2
    with np.errstate(invalid="ignore", divide="ignore"):
        r = cov / np.sqrt(vx * vy)
    scale = np.maximum(np.abs(m["_xx"]), 1e-300) * np.maximum(np.abs(m["_yy"]), 1e-300)
    return r.where((vx * vy) > 1e-12 * scale).clip(-1, 1)


def dpo_length_table(frame: pd.DataFrame, decisions: pd.DataFrame) -> pd.DataFrame:
    """Per domain (and all): DPO pairs, mean chosen and rejected length, share with the longer chosen."""
    import numpy as np
    import pandas as pd

    length = pd.Series(frame["length"].to_numpy(), index=frame["response_id"].to_numpy())
    length = length[~length.index.duplicated()]
    d = decisions[decisions["assigned"] == "dpo"]
    c = length.reindex(d["chosen_response_id"].to_numpy()).to_numpy()
    r = length.reindex(d["rejected_response_id"].to_numpy()).to_numpy()
    f = pd.DataFrame({"domain": d["domain"].to_numpy(), "chosen": c, "rejected": r,
                      "longer": (c > r).astype(np.float64), "shorter": (c < r).astype(np.float64)})
    f = f[~np.isnan(c) & ~np.isnan(r)]
    parts = [f.assign(domain=ALL), f] if len(f) else [f]
    t = pd.concat(parts).groupby("domain", sort=False).agg(
        pairs=("chosen", "size"), chosen_length=("chosen", "mean"), rejected_length=("rejected", "mean"),
        chosen_longer=("longer", "mean"), chosen_shorter=("shorter", "mean"))
    return t.reset_index()


# -- the whole audit ----------------------------------------------------------------------------
def compute(prompts: pa.Table, scores: pa.Table, responses: pa.Table,
            decisions: pd.DataFrame) -> tuple[dict, pd.DataFrame]:
    """The audit (tables as pandas frames, plus warnings) and the per-response frame it came from."""
    frame = response_frame(prompts, scores, responses)
    judged = judged_table(frame, decisions)
    audit = {"judged": judged, "rewards": reward_table(frame), "dpo_length": dpo_length_table(frame, decisions),
             "warnings": warnings_of(judged)}
    return audit, frame


def audit_run(run: Path) -> tuple[dict, pd.DataFrame]:
    """The audit of a built run directory (prompts, responses, scores, datasets/decisions)."""
    prompts = read(PROMPTS, run / "prompts" / "prompts.parquet", ["prompt_id", "meta"], only=True)
    # the texts (gigabytes at the recipe's volume) only where some prompt carries an exact answer
    texts = ["text"] if expected_answers(prompts) else []
    responses = read(RESPONSES, run / "responses" / "responses.parquet",
                     ["response_id", "completion_tokens", *texts], only=True)
    scores = read(SCORES, run / "scores" / "scores.parquet",  # not the 19 objective rewards per row
                  ["response_id", "prompt_id", "source", "domain", "reward", "check_status"], only=True)
    decisions = read(DECISIONS, run / "datasets" / "decisions.parquet").to_pandas()
    return compute(prompts, scores, responses, decisions)


def _records(frame: pd.DataFrame) -> list[dict]:
    rows = frame.to_dict(orient="records")
    return [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in rows]


def to_json(audit: dict) -> str:
    """audit.json: each table as a list of records (NaN as null), plus the warnings."""
    import numpy as np

    def plain(v):
        return v.item() if isinstance(v, np.generic) else v

    body = {k: ([{c: plain(x) for c, x in r.items()} for r in _records(v)] if k != "warnings" else v)
            for k, v in audit.items()}
    body = json.loads(json.dumps(body, default=plain))  # NumPy scalars to plain numbers
    return json.dumps(body, indent=2) + "\n"


def load(folder: Path) -> dict | None:
    """A run's audit as written by the build (`datasets/audit.json`), or None when there is none."""
    path = folder / AUDIT_FILE
    return json.loads(path.read_text()) if path.exists() else None


# -- presentation -------------------------------------------------------------------------------
def cell(v, kind: str = "") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if kind == "pct":
        return f"{100 * v:.0f}%"
    if isinstance(v, float):
        return f"{v:.2f}" if kind == "2" else f"{v:.4f}"
    return str(v)


def judged_rows(records: list[dict], sources: bool = True) -> tuple[list[str], list[list[str]]]:
    """The judged table as header + rows of text (records: audit.json's `judged`)."""
    header = ["domain", "source", "decided by", "prompts with a right response", "competing prompts",
              "pairwise accuracy (right vs wrong)", "top-1 right", "chance", "SFT rows right",
              "DPO chosen right", "DPO rejected right"]
    rows = []
    for r in records:
        if not sources and r["source"] != ALL:
            continue
        share = r["prompts_right"] / r["prompts"] if r["prompts"] else float("nan")
        rows.append([
            r["domain"], r["source"], r["decided_by"], f"{cell(share, 'pct')} of {r['prompts']}",
            str(r["competing"]), cell(r["pairwise_accuracy"], "2"), cell(r["top1_right"], "pct"),
            cell(r["chance"], "pct"), f"{r['sft_right']} / {r['sft_rows']}",
            f"{r['dpo_chosen_right']} / {r['dpo_pairs']}", f"{r['dpo_rejected_right']} / {r['dpo_pairs']}",
        ])
    return header, rows


def _pipe(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def markdown(audit: dict, level: int = 2, sources: bool = True) -> str:
    """The audit's report section (audit: audit.json's content). `sources=False`: the per-domain
    rows only (the eval table)."""
    h = "#" * level
    parts = [f"{h} Reward-model audit",
             "Where a checker knows the truth (math answers, code tests, exact answers): the reward "
             "model's accuracy on right-vs-wrong responses to one prompt (ties half), how often its top "
             "pick is right against a random pick, and how many selected rows are right. `decided by`: "
             "whether the reward model or a checker separates right from wrong in that domain's data."]
    warnings = audit.get("warnings") or []
    parts += [f"**WARNING: {w}.**" for w in warnings]
    if audit.get("judged"):
        parts.append(_pipe(*judged_rows(audit["judged"], sources)))
    else:
        parts.append("No domain with a checker's truth in this run.")
    if sources and audit.get("rewards"):
        header = ["domain", "source", "n", "mean", "std", "min", "median", "max", "corr. with length (Pearson)",
                  "(Spearman)"]
        rows = [[r["domain"], r["source"], str(r["n"]), *(cell(r[k]) for k in ("mean", "std", "min", "median", "max")),
                 cell(r["length_pearson"], "2"), cell(r["length_spearman"], "2")] for r in audit["rewards"]]
        parts += [f"{h}# Rewards per domain and source, and their correlation with length (completion tokens)",
                  _pipe(header, rows)]
    if sources and audit.get("dpo_length"):
        header = ["domain", "pairs", "chosen length", "rejected length", "chosen longer", "chosen shorter"]
        rows = [[r["domain"], str(r["pairs"]), f"{r['chosen_length']:.1f}", f"{r['rejected_length']:.1f}",
                 cell(r["chosen_longer"], "pct"), cell(r["chosen_shorter"], "pct")] for r in audit["dpo_length"]]
        parts += [f"{h}# DPO chosen against rejected length (completion tokens)", _pipe(header, rows)]
    return "\n\n".join(parts)


def plot(audit: dict, frame: pd.DataFrame, path: Path) -> Path:
    """Left: pairwise accuracy and top-1 pick against chance per domain (all sources). Right: the
    reward distribution per domain."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = [r for r in audit["judged"] if r["source"] == ALL]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    x = np.arange(len(rows))
    nan = float("nan")
    val = lambda k: [nan if r[k] is None else r[k] for r in rows]  # noqa: E731
    a.bar(x - 0.27, val("pairwise_accuracy"), 0.27, label="pairwise accuracy")
    a.bar(x, val("top1_right"), 0.27, label="top-1 right")
    a.bar(x + 0.27, val("chance"), 0.27, label="top-1 by chance")
    a.axhline(0.5, color="grey", lw=0.8, ls="--")
    a.set_xticks(x, [r["domain"] + ("*" if r["decided_by"] == "reward model" else "") for r in rows])
    a.set(ylim=(0, 1), title="Reward model against the checkers (* = it decides the data)")
    a.legend(fontsize=8)
    if len(frame):
        for dom, g in frame.groupby("domain"):
            b.hist(g["reward"].dropna(), bins=50, histtype="step", label=str(dom))
        b.legend(fontsize=8)
    b.set(xlabel="reward", ylabel="responses", title="Rewards per domain")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
