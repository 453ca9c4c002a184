"""Build the SFT and DPO data sets from scored responses (RECIPE_FACTS "Building SFT and DPO data").

Rules, per domain:
- instruction: SFT row = the best-scored response over all sources; DPO pair = ONE source's best
  vs its worst response (two distinct responses), kept when band.low <= margin <= band.high.
- math: chosen = the best-scored correct response, rejected = the worst-scored incorrect one, same
  source, same band. "Incorrect" includes `unparseable` (no final answer is a wrong answer);
  `timeout` and `error` say nothing about the answer, so such responses are never picked.
- code: chosen = the best-scored passing response, rejected = the worst-scored failing one (`fail`
  or `timeout`: code that runs forever fails its tests); `error` (the checker broke) is never picked.
- chinese: SFT only.

How prompts reach a set (the recipe is silent on several points; each choice is an option):
- a domain listed in `build.sft_fraction` is split by a seeded hash of the prompt id (stable when
  prompts are added or removed): a share `sft_fraction` goes to SFT, the rest to DPO; a DPO prompt
  without an in-band pair is dropped (`no_pair_in_band`). With `build.band_before_split`, prompts
  that have an in-band pair are given to DPO first, up to the DPO share of their data set.
- a domain not listed ("pair if possible, else SFT", the default for math and code: the published
  per-data-set counts of both differ from any fixed fraction) goes to DPO when it has an in-band
  pair and to SFT with its best eligible response otherwise.
- several sources with an in-band pair: `build.pair_policy` picks one (default best_chosen: the
  pair whose chosen response scores highest); remaining ties go to the earlier source in the recipe.
- ties between responses: the earlier source in the recipe, then the lower sample index, then the
  smaller response id.
- null rewards (unscorable responses) and, with `build.drop_truncated`, truncated responses take
  no part in selection; they are counted per source in the manifest.

Every prompt ends up in `decisions.parquet` with the set it went to or the reason it was dropped;
the manifest balances prompts in = SFT rows + DPO rows + dropped by reason.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fusechat import audit as rm_audit
from fusechat.errors import InputError
from fusechat.recipe import RecipeError
from fusechat.run import Manifest, atomic_write_bytes, stage_dir, write_table
from fusechat.tables import CHECK_STATUSES, DECISIONS, DOMAINS, DPO, PROMPTS, RESPONSES, RIGHT, SCORES, SFT, WRONG, read

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd
    import pyarrow as pa

    from fusechat.recipe import Build, Recipe

NO_GOOD_REASON = {"math": "no_correct_response", "code": "no_passing_response"}
SFT_ONLY = ("chinese",)
# Margins are differences of float32 rewards (resolution ~1e-7): without a tolerance, 0.61 - 0.51
# falls just outside a band whose edge is 0.1.
BAND_EPS = 1e-6

# the columns of each input table that the build reads (the tables hold more: fusechat.tables)
PROMPT_COLUMNS = ("prompt_id", "dataset", "domain", "messages")
# (the texts are read apart, for the selected rows only: `_texts`)
RESPONSE_COLUMNS = ("response_id", "prompt_id", "source", "model_revision", "sample_index")
SCORE_COLUMNS = ("response_id", "prompt_id", "source", "reward", "check_status", "truncated")


@dataclass
class Selection:
    """What the rules picked. Row numbers index the prompts and responses tables."""

    decisions: pd.DataFrame  # one row per prompt: prompt, assigned, reason, split, picked rows
    sft: pd.DataFrame  # prompt, response, source, score, split
    dpo: pd.DataFrame  # prompt, chosen, rejected, source, chosen_score, rejected_score, margin, split
    excluded: pd.DataFrame  # per source: responses, null_reward, truncated


def unit_hash(ids, seed: int, purpose: str) -> np.ndarray:
    """A uniform [0, 1) number per id, fixed by (seed, purpose): the same prompt always lands in
    the same split, whatever else is in the run. pandas' SipHash is vectorised and keyed."""
    import numpy as np
    import pandas as pd

    key = hashlib.sha256(f"{seed}:{purpose}".encode()).hexdigest()[:16]
    h = pd.util.hash_array(np.asarray(ids, dtype=object), hash_key=key, categorize=False)
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def _first_of_groups(keys: np.ndarray) -> np.ndarray:
    """Positions where a sorted key array starts a new group."""
    import numpy as np

    if len(keys) == 0:
        return np.zeros(0, dtype=bool)
    return np.concatenate(([True], keys[1:] != keys[:-1]))


@dataclass
class Responses:
    """The scored responses as arrays (row i = response i), strings as small integer codes:
    comparisons on a million Python strings dominate the selection otherwise."""

    prompt: np.ndarray  # row of the response's prompt
    reward: np.ndarray  # NaN = null
    truncated: np.ndarray
    sample: np.ndarray  # sample index
    response_id: pd.Series
    source: np.ndarray  # code into source_names
    source_names: np.ndarray
    source_rank: np.ndarray  # the source's place in the recipe (unknown sources after, by name)
    n_ranks: int
    status: np.ndarray  # code into status_names
    status_names: np.ndarray
    domain: np.ndarray  # the prompt's domain, per response: code into domain_names
    domain_names: np.ndarray

    @classmethod
    def of(cls, prompts: pd.DataFrame, resp: pd.DataFrame, source_order: list[str]) -> Responses:
        import numpy as np
        import pandas as pd

        prompt = resp["p"].to_numpy(dtype=np.int64)
        src = pd.Categorical(resp["source"])
        source, source_names = src.codes.astype(np.int64), np.asarray(src.categories, dtype=object)
        order = {s: i for i, s in enumerate(source_order)}
        extra = sorted(set(source_names) - set(order))  # e.g. a data set's own solutions
        order.update({s: len(source_order) + i for i, s in enumerate(extra)})
        status = pd.Categorical(resp["check_status"])
        domain, domain_names = pd.factorize(prompts["domain"])
        return cls(
            prompt=prompt, reward=resp["reward"].to_numpy(dtype=np.float64),
            truncated=resp["truncated"].to_numpy(dtype=bool), sample=resp["sample_index"].to_numpy(dtype=np.int64),
            response_id=resp["response_id"], source=source, source_names=source_names,
            source_rank=np.array([order[s] for s in source_names], dtype=np.int64)[source], n_ranks=len(order),
            status=status.codes, status_names=np.asarray(status.categories, dtype=object),
            domain=domain[prompt], domain_names=np.asarray(domain_names, dtype=object),
        )

    def source_of(self, rows) -> np.ndarray:
        return self.source_names[self.source[rows]]

    def in_domain(self, names) -> np.ndarray:
        import numpy as np

        return np.isin(self.domain, np.flatnonzero(np.isin(self.domain_names, names)))

    def status_in(self, statuses, rows) -> np.ndarray:
        """Whether each of `rows` (a mask or indices) has one of `statuses`."""
        import numpy as np

        return np.isin(self.status_names, statuses)[self.status[rows]]


@dataclass
class Eligibility:
    eligible: np.ndarray  # takes part in selection: a reward, and not truncated when those are dropped
    good: np.ndarray  # eligible and may be chosen (SFT, or DPO chosen): math correct, code pass, any other
    bad: np.ndarray  # eligible and may be rejected in math and code (incorrect/unparseable, fail/timeout)
    excluded: pd.DataFrame  # per source: responses, null_reward, truncated (dropped ones only)


def eligibility(r: Responses, build: Build) -> Eligibility:
    """Which responses take part, and in which role; what is left out, per source."""
    import numpy as np
    import pandas as pd

    null = np.isnan(r.reward)
    trunc = r.truncated & ~null
    eligible = ~null & ~(trunc if build.drop_truncated else np.zeros_like(trunc))
    n = len(r.source_names)
    excluded = pd.DataFrame({
        "responses": np.bincount(r.source, minlength=n),
        "null_reward": np.bincount(r.source[null], minlength=n),
        "truncated": np.bincount(r.source[trunc], minlength=n) * build.drop_truncated,
    }, index=pd.Index(r.source_names, name="source")).sort_index()
    good = eligible.copy()
    bad = np.zeros_like(eligible)
    for dom, statuses in RIGHT.items():  # the math and code domains get the check of their name
        in_dom = r.in_domain([dom])
        good[in_dom] &= r.status_in(statuses, in_dom)
        bad[in_dom] = eligible[in_dom] & r.status_in(WRONG[dom], in_dom)
    return Eligibility(eligible, good, bad, excluded)


def best_per_group(r: Responses, rows: np.ndarray, group: np.ndarray, primary: np.ndarray,
                   ties: list[np.ndarray]) -> np.ndarray:
    """Per group, the row of `rows` with the smallest `primary`; ties by `ties` in order, then
    response id. Sorted by group.

    Only rows that reach their group's extreme are sorted (hash group-by first): sorting all rows
    by five keys costs more than the whole rest of the selection."""
    import numpy as np
    import pandas as pd

    g, v = group[rows], primary[rows]
    extreme = pd.Series(v).groupby(g).transform("min").to_numpy()
    cand = rows[v == extreme]
    rid_rank = r.response_id.iloc[cand].rank(method="first").to_numpy()
    cand = cand[np.lexsort((rid_rank, *(t[cand] for t in reversed(ties)), group[cand]))]
    return cand[_first_of_groups(group[cand])]


def sft_winners(r: Responses, good: np.ndarray, n_prompts: int) -> np.ndarray:
    """Per prompt, the response row of its SFT answer (-1: none): highest reward, then recipe
    source order, sample index, response id."""
    import numpy as np

    rows = best_per_group(r, np.flatnonzero(good), r.prompt, -r.reward, [r.source_rank, r.sample])
    winner = np.full(n_prompts, -1, dtype=np.int64)
    winner[r.prompt[rows]] = rows
    return winner


def candidate_pairs(r: Responses, el: Eligibility) -> tuple[np.ndarray, np.ndarray]:
    """(chosen rows, rejected rows): one pair per (prompt, source) that has both, the best response
    of the chosen pool against the worst of the rejected pool, two distinct responses.

    Instruction responses are all in both pools; SFT-only domains have no pairs."""
    import numpy as np

    pairable = ~r.in_domain(SFT_ONLY)
    group = r.prompt * r.n_ranks + r.source_rank
    chosen = best_per_group(r, np.flatnonzero(el.good & pairable), group, -r.reward, [r.sample])
    reject_pool = el.bad | (el.eligible & r.in_domain(["instruction"]))
    reject_pool[chosen] = False  # a pair is two distinct responses
    rejected = best_per_group(r, np.flatnonzero(reject_pool & pairable), group, r.reward, [r.sample])
    # both are sorted by group: match them with a merge on the group key
    pos = np.searchsorted(group[rejected], group[chosen])
    inside = pos < len(rejected)
    matched = np.zeros(len(chosen), dtype=bool)
    matched[inside] = group[rejected[pos[inside]]] == group[chosen[inside]]
    return chosen[matched], rejected[pos[matched]]


def in_band(r: Responses, chosen: np.ndarray, rejected: np.ndarray, band) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The pairs whose margin (chosen reward - rejected reward) lies in the band: (chosen, rejected, margin)."""
    margin = r.reward[chosen] - r.reward[rejected]
    keep = (margin >= band.low - BAND_EPS) & (margin <= band.high + BAND_EPS)
    return chosen[keep], rejected[keep], margin[keep]


def pick_pairs(r: Responses, chosen: np.ndarray, rejected: np.ndarray, margin: np.ndarray, policy: str,
               n_prompts: int) -> tuple[np.ndarray, np.ndarray]:
    """Per prompt, the in-band pair `build.pair_policy` prefers among its sources, as (chosen row,
    rejected row) arrays (-1: no pair); remaining ties go to the earlier source in the recipe."""
    import numpy as np

    key = {
        "largest_margin": -margin,
        "smallest_margin": margin,
        "best_chosen": -r.reward[chosen],
        "source_order": np.zeros(len(chosen)),
    }[policy]
    prompt = r.prompt[chosen]
    order = np.lexsort((r.source_rank[chosen], key, prompt))
    order = order[_first_of_groups(prompt[order])]
    pair_chosen = np.full(n_prompts, -1, dtype=np.int64)
    pair_rejected = np.full(n_prompts, -1, dtype=np.int64)
    pair_chosen[prompt[order]] = chosen[order]
    pair_rejected[prompt[order]] = rejected[order]
    return pair_chosen, pair_rejected


@dataclass
class Assignment:
    assigned: np.ndarray  # per prompt: sft | dpo | dropped
    reason: np.ndarray
    split: np.ndarray  # train | test, None when dropped


def assign(prompts: pd.DataFrame, r: Responses, eligible: np.ndarray, has_sft: np.ndarray, has_pair: np.ndarray,
           build: Build) -> Assignment:
    """Which set each prompt goes to, and why (the rules of the module docstring)."""
    import numpy as np
    import pandas as pd

    n_prompts = len(prompts)
    domains = prompts["domain"].to_numpy(dtype=object)
    has_resp = np.bincount(r.prompt, minlength=n_prompts) > 0
    has_elig = np.bincount(r.prompt[eligible], minlength=n_prompts) > 0
    u_split = unit_hash(prompts["prompt_id"], build.seed, "split")
    u_test = unit_hash(prompts["prompt_id"], build.seed, "test")
    frac = prompts["domain"].map(build.sft_fraction).to_numpy(dtype=np.float64)  # NaN: not split
    is_split = ~np.isnan(frac) & ~np.isin(domains, SFT_ONLY)
    sft_only = np.isin(domains, SFT_ONLY)
    to_dpo = np.zeros(n_prompts, dtype=bool)
    if build.band_before_split:
        # the DPO share of each data set, filled first from the prompts that have a pair
        usable = has_elig & is_split
        ds = prompts["dataset"].to_numpy(dtype=object)
        frame = pd.DataFrame({"ds": ds, "usable": usable, "pair": has_pair & usable, "u": -u_split})
        quota = frame.groupby("ds")["usable"].transform("sum") * (1 - np.nan_to_num(frac))
        rank = frame[frame["pair"]].groupby("ds")["u"].rank(method="first")
        to_dpo[rank.index.to_numpy()] = rank.to_numpy() <= np.round(quota[rank.index].to_numpy())
    else:
        to_dpo = is_split & (u_split >= np.nan_to_num(frac))
    pair_first = ~is_split & ~sft_only

    assigned = np.full(n_prompts, "dropped", dtype=object)
    reason = np.full(n_prompts, "", dtype=object)
    dpo_ok = has_pair & (to_dpo | pair_first)
    sft_ok = has_sft & ~dpo_ok & ~(is_split & to_dpo)
    assigned[dpo_ok], assigned[sft_ok] = "dpo", "sft"
    reason[is_split & to_dpo] = "split_dpo"
    reason[is_split & ~to_dpo] = "split_sft"
    reason[pair_first & has_pair] = "pair_in_band"
    reason[pair_first & ~has_pair] = "sft_fallback_no_pair"
    reason[sft_only] = "sft_only"
    dropped = assigned == "dropped"
    reason[dropped & is_split & to_dpo] = "no_pair_in_band"
    for dom, why in NO_GOOD_REASON.items():
        reason[dropped & (domains == dom) & ~has_sft] = why
    reason[dropped & ~has_elig] = "no_eligible_response"
    reason[dropped & ~has_resp] = "no_responses"

    split = np.where(u_test < build.test_fraction, "test", "train").astype(object)
    split[dropped] = None
    return Assignment(assigned, reason, split)


def select(prompts: pd.DataFrame, resp: pd.DataFrame, build: Build, source_order: list[str]) -> Selection:
    """Apply the selection rules.

    prompts: prompt_id, dataset, domain (row i = prompt i). resp: one row per scored response with
    p (prompt row), response_id, source, sample_index, reward (NaN = null), check_status, truncated
    (as `load_inputs` returns them).
    """
    import numpy as np
    import pandas as pd

    n_prompts = len(prompts)
    r = Responses.of(prompts, resp, source_order)
    el = eligibility(r, build)
    sft_pick = sft_winners(r, el.good, n_prompts)
    chosen, rejected, margin = in_band(r, *candidate_pairs(r, el), build.band)
    pair_c, pair_r = pick_pairs(r, chosen, rejected, margin, build.pair_policy, n_prompts)
    a = assign(prompts, r, el.eligible, sft_pick >= 0, pair_c >= 0, build)

    reward = r.reward
    picked_c = np.where(a.assigned == "dpo", pair_c, np.where(a.assigned == "sft", sft_pick, -1))
    picked_r = np.where(a.assigned == "dpo", pair_r, -1)
    decisions = pd.DataFrame({
        "prompt_id": prompts["prompt_id"].to_numpy(), "dataset": prompts["dataset"].to_numpy(),
        "domain": prompts["domain"].to_numpy(dtype=object), "assigned": a.assigned, "reason": a.reason,
        "split": a.split, "source_model": np.where(picked_c >= 0, r.source_of(np.maximum(picked_c, 0)), None),
        "chosen_row": picked_c, "rejected_row": picked_r,
    })
    s = np.flatnonzero(a.assigned == "sft")
    sft = pd.DataFrame({"prompt": s, "response": sft_pick[s], "source": r.source_of(sft_pick[s]),
                        "score": reward[sft_pick[s]], "split": a.split[s]})
    d = np.flatnonzero(a.assigned == "dpo")
    dc, dr = pair_c[d], pair_r[d]
    dpo = pd.DataFrame({"prompt": d, "chosen": dc, "rejected": dr, "source": r.source_of(dc),
                        "chosen_score": reward[dc], "rejected_score": reward[dr],
                        "margin": reward[dc] - reward[dr], "split": a.split[d]})
    return Selection(decisions=decisions, sft=sft, dpo=dpo, excluded=el.excluded)


def _fail(path: Path, row: int, field: str, msg: str) -> None:
    raise InputError(path, msg, row=row, field=field)


def _first_true(mask) -> int:
    import numpy as np

    return int(np.flatnonzero(np.asarray(mask))[0])


def _arrow_mask(mask) -> np.ndarray:
    import pyarrow.compute as pc

    return pc.fill_null(mask, True).to_numpy(zero_copy_only=False)


def _check_unique(values, path: Path, field: str) -> None:
    import pyarrow.compute as pc

    if pc.count_distinct(values, mode="all").as_py() != len(values):
        dup = values.to_pandas().duplicated()
        row = _first_true(dup)
        _fail(path, row, field, f"{values[row].as_py()!r} appears twice")


def load_inputs(run: Path) -> tuple[pa.Table, pa.Table, pd.DataFrame, pd.DataFrame]:
    """Read and cross-check prompts, responses and scores (Arrow compute: hash joins in C).

    Returns the prompts and responses tables and two frames for `select`: prompts (prompt_id,
    dataset, domain) and one row per score: p (prompt row), r (response row), response_id,
    source and check_status (categorical), sample_index, reward (NaN = null), truncated.
    """
    import numpy as np
    import pandas as pd
    import pyarrow as pa
    import pyarrow.compute as pc

    inputs = ((PROMPTS, PROMPT_COLUMNS), (RESPONSES, RESPONSE_COLUMNS), (SCORES, SCORE_COLUMNS))
    paths = {spec.name: run / spec.path for spec, _ in inputs}
    # the latest stage's table first: a run without scores says to run `fusechat score` first
    got = {spec.name: read(spec, paths[spec.name], cols, only=spec is RESPONSES) for spec, cols in reversed(inputs)}
    prompts_t, responses_t, scores_t = got["prompts"], got["responses"], got["scores"]
    pp, rp, sp = paths["prompts"], paths["responses"], paths["scores"]

    def col(table, name):
        return table.column(name).combine_chunks()

    pid = col(prompts_t, "prompt_id")
    _check_unique(pid, pp, "prompt_id")
    bad = _arrow_mask(pc.invert(pc.is_in(col(prompts_t, "domain"), value_set=pa.array(DOMAINS))))
    if bad.any():
        row = _first_true(bad)
        _fail(pp, row, "domain", f"{prompts_t['domain'][row].as_py()!r} is not one of {', '.join(DOMAINS)}")
    null_msgs = _arrow_mask(pc.is_null(col(prompts_t, "messages")))
    if null_msgs.any():
        _fail(pp, _first_true(null_msgs), "messages", "is null")

    rid_resp = col(responses_t, "response_id")
    _check_unique(rid_resp, rp, "response_id")
    rid = col(scores_t, "response_id")
    r = pc.index_in(rid, value_set=rid_resp)
    missing = _arrow_mask(pc.is_null(r))
    if missing.any():
        row = _first_true(missing)
        _fail(sp, row, "response_id", f"{rid[row].as_py()!r} is not in {rp}")
    r = r.to_numpy(zero_copy_only=False).astype(np.int64)
    # response ids are unique in responses, so a repeat in scores shows as a response hit twice
    twice = np.bincount(r, minlength=len(rid_resp))[r] > 1
    if twice.any():
        row = int(np.flatnonzero(twice)[1])
        _fail(sp, row, "response_id", f"{rid[row].as_py()!r} appears twice")
    r_idx = pa.array(r)
    for field in ("prompt_id", "source"):
        ours, theirs = col(scores_t, field), col(responses_t, field).take(r_idx)
        differs = _arrow_mask(pc.not_equal(ours, theirs))
        if differs.any():
            row = _first_true(differs)
            _fail(sp, row, field, f"{ours[row].as_py()!r} but {rp} row {r[row]} (same response_id) "
                  f"says {theirs[row].as_py()!r}: prompts and responses are misaligned")
    p = pc.index_in(col(scores_t, "prompt_id"), value_set=pid)
    missing = _arrow_mask(pc.is_null(p))
    if missing.any():
        row = _first_true(missing)
        _fail(sp, row, "prompt_id", f"{scores_t['prompt_id'][row].as_py()!r} is not in {pp}")
    p = p.to_numpy(zero_copy_only=False).astype(np.int64)
    if "domain" in scores_t.column_names:
        ours, theirs = col(scores_t, "domain"), col(prompts_t, "domain").take(pa.array(p))
        differs = _arrow_mask(pc.not_equal(ours, theirs))
        if differs.any():
            row = _first_true(differs)
            _fail(sp, row, "domain", f"{ours[row].as_py()!r} but the prompt's domain is {theirs[row].as_py()!r}")
    reward = col(scores_t, "reward").cast(pa.float64()).to_numpy(zero_copy_only=False)
    if np.isinf(reward).any():
        _fail(sp, _first_true(np.isinf(reward)), "reward", "is infinite")
    status = col(scores_t, "check_status")
    bad = _arrow_mask(pc.invert(pc.is_in(status, value_set=pa.array(CHECK_STATUSES))))
    if bad.any():
        row = _first_true(bad)
        _fail(sp, row, "check_status", f"{status[row].as_py()!r} is not one of {', '.join(CHECK_STATUSES)}")
    truncated = col(scores_t, "truncated")
    if truncated.null_count:
        _fail(sp, _first_true(_arrow_mask(pc.is_null(truncated))), "truncated", "is null")
    resp = pd.DataFrame({
        "p": p, "r": r, "response_id": rid.to_pandas(),
        "source": col(scores_t, "source").dictionary_encode().to_pandas(),
        "sample_index": col(responses_t, "sample_index").take(r_idx).to_numpy(zero_copy_only=False),
        "reward": reward, "check_status": status.dictionary_encode().to_pandas(),
        "truncated": truncated.to_numpy(zero_copy_only=False),
    })
    prompts = prompts_t.select(["prompt_id", "dataset", "domain"]).to_pandas()
    return prompts_t, responses_t, prompts, resp


def _texts(rows, path: Path) -> pa.Array:
    """The texts of the given rows of the responses table, in that order. Read one row group at a
    time and only where a selected row lies: the column holds gigabytes at the recipe's volume,
    the data sets a tenth of it."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    rows = np.asarray(rows, dtype=np.int64)
    order = np.argsort(rows, kind="stable")
    wanted = rows[order]
    file = pq.ParquetFile(path)
    if "text" not in file.schema_arrow.names:
        raise InputError(path, "missing column text of the responses table (docs/architecture.md)")
    sizes = np.array([file.metadata.row_group(g).num_rows for g in range(file.num_row_groups)], dtype=np.int64)
    starts = np.concatenate(([0], np.cumsum(sizes)))
    # row groups in runs of about 2^17 rows (a few hundred MB of text), each run read at once
    run_of = starts[:-1] // (1 << 17)
    parts = []
    for run in np.unique(run_of):
        groups = np.flatnonzero(run_of == run)
        lo_row, hi_row = starts[groups[0]], starts[groups[-1] + 1]
        lo, hi = np.searchsorted(wanted, [lo_row, hi_row])
        if hi > lo:
            column = file.read_row_groups(groups.tolist(), columns=["text"]).column(0)
            parts.append(column.take(pa.array(wanted[lo:hi] - lo_row)).combine_chunks().cast(pa.string()))
    got = pa.concat_arrays(parts) if parts else pa.array([], pa.string())
    back = np.empty(len(rows), dtype=np.int64)
    back[order] = np.arange(len(rows))
    texts = got.take(pa.array(back))
    nulls = pc.is_null(texts).to_numpy(zero_copy_only=False)
    if nulls.any():
        _fail(path, int(rows[_first_true(nulls)]), "text", "is null but the response was selected")
    return texts


def _turns(roles: pa.Array, contents: pa.Array, offsets) -> pa.Array:
    import pyarrow as pa

    values = pa.StructArray.from_arrays([roles.cast(pa.string()), contents.cast(pa.string())], names=["role", "content"])
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), values)


def _assistant(texts: pa.Array) -> pa.Array:
    import numpy as np
    import pyarrow as pa

    n = len(texts)
    return _turns(pa.array(["assistant"] * n), texts, np.arange(n + 1))


def _prompt_messages(prompts_t: pa.Table, rows) -> pa.Array:
    """The prompt turns of the given prompt rows, reduced to {role, content}."""
    import numpy as np
    import pyarrow as pa

    lists = prompts_t.column("messages").take(pa.array(rows, pa.int64())).combine_chunks()
    flat = lists.flatten()
    offsets = np.concatenate(([0], np.cumsum(lists.value_lengths().to_numpy(zero_copy_only=False))))
    return _turns(flat.field("role"), flat.field("content"), offsets)


def _conversation(prompt_lists: pa.Array, texts: pa.Array) -> pa.Array:
    """Each prompt's turns followed by one assistant turn, built column-wise with a take index."""
    import numpy as np
    import pyarrow as pa

    n = len(texts)
    flat = prompt_lists.flatten()
    lengths = prompt_lists.value_lengths().to_numpy(zero_copy_only=False) + 1
    offsets = np.concatenate(([0], np.cumsum(lengths)))
    reply_at = offsets[1:] - 1
    take = np.empty(offsets[-1], dtype=np.int64)
    is_prompt = np.ones(offsets[-1], dtype=bool)
    is_prompt[reply_at] = False
    take[is_prompt] = np.arange(len(flat))
    take[reply_at] = len(flat) + np.arange(n)
    roles = pa.concat_arrays([flat.field("role"), pa.array(["assistant"] * n, pa.string())])
    contents = pa.concat_arrays([flat.field("content"), texts])
    idx = pa.array(take)
    return _turns(roles.take(idx), contents.take(idx), offsets)


def output_tables(sel: Selection, prompts_t: pa.Table, responses_t: pa.Table, resp: pd.DataFrame,
                  responses_path: Path) -> dict[str, pa.Table]:
    """TRL conversational tables: {"sft/train": ..., "sft/test": ..., "dpo/train": ..., "dpo/test": ...}."""
    import pyarrow as pa

    import numpy as np

    r = resp["r"].to_numpy()
    meta = prompts_t.select(["prompt_id", "dataset", "domain"])
    frames = {split: (sel.sft[sel.sft["split"] == split], sel.dpo[sel.dpo["split"] == split])
              for split in ("train", "test")}
    # every selected text in one pass over the responses table
    wanted = {(split, col): r[(s if col == "response" else d)[col].to_numpy()]
              for split, (s, d) in frames.items() for col in ("response", "chosen", "rejected")}
    ends = np.cumsum([len(v) for v in wanted.values()])
    every = _texts(np.concatenate(list(wanted.values())), responses_path)
    got = {key: every.slice(end - len(v), len(v)) for (key, v), end in zip(wanted.items(), ends)}
    out: dict[str, pa.Table] = {}
    for split, (s, d) in frames.items():
        prompt_rows = s["prompt"].to_numpy()
        m = meta.take(pa.array(prompt_rows, pa.int64()))
        msgs = _conversation(_prompt_messages(prompts_t, prompt_rows), got[split, "response"])
        out[f"sft/{split}"] = pa.table({
            "messages": msgs, "prompt_id": m["prompt_id"], "dataset": m["dataset"], "domain": m["domain"],
            "source_model": pa.array(s["source"].to_numpy(), pa.string()),
            "score": pa.array(s["score"].to_numpy(), pa.float64()),
        })
        prompt_rows = d["prompt"].to_numpy()
        m = meta.take(pa.array(prompt_rows, pa.int64()))
        out[f"dpo/{split}"] = pa.table({
            "prompt": _prompt_messages(prompts_t, prompt_rows),
            "chosen": _assistant(got[split, "chosen"]),
            "rejected": _assistant(got[split, "rejected"]),
            "prompt_id": m["prompt_id"], "dataset": m["dataset"], "domain": m["domain"],
            "source_model": pa.array(d["source"].to_numpy(), pa.string()),
            "chosen_score": pa.array(d["chosen_score"].to_numpy(), pa.float64()),
            "rejected_score": pa.array(d["rejected_score"].to_numpy(), pa.float64()),
            "margin": pa.array(d["margin"].to_numpy(), pa.float64()),
        })
    return out


def markdown_table(frame: pd.DataFrame) -> str:
    """A pipe table; pandas' to_markdown needs the extra `tabulate` package for the same thing."""
    cols = [str(c) for c in frame.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in frame.itertuples(index=False):
        lines.append("| " + " | ".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in row) + " |")
    return "\n".join(lines)


def summary_tables(sel: Selection, prompts: pd.DataFrame, resp: pd.DataFrame, build: Build) -> dict[str, pd.DataFrame]:
    """The report's tables: counts, drops, exclusions, score distributions, margins, SFT winners."""
    import numpy as np
    import pandas as pd

    dec = sel.decisions
    key = np.where(dec["assigned"] == "dropped", "dropped", dec["assigned"] + " " + dec["split"].fillna(""))
    counts = pd.crosstab([dec["dataset"], dec["domain"]], key)
    for col in ("sft train", "sft test", "dpo train", "dpo test", "dropped"):
        if col not in counts:
            counts[col] = 0
    counts = counts[["sft train", "sft test", "dpo train", "dpo test", "dropped"]]
    counts.insert(0, "prompts", counts.sum(axis=1))
    counts = counts.reset_index()
    total = counts.drop(columns=["dataset", "domain"]).sum()
    counts.loc[len(counts)] = ["total", "", *total.tolist()]

    drops = (dec[dec["assigned"] == "dropped"].groupby(["domain", "reason"]).size()
             .rename("prompts").reset_index())
    excluded = sel.excluded.reset_index()

    eligible = resp[~np.isnan(resp["reward"].to_numpy())]
    q = eligible.groupby("source")["reward"]
    scores = pd.DataFrame({"n": q.size(), "mean": q.mean(), "std": q.std(), "min": q.min(),
                           "p25": q.quantile(0.25), "median": q.median(), "p75": q.quantile(0.75),
                           "max": q.max()}).reset_index()

    edges = np.linspace(build.band.low, build.band.high, 11)
    hist, _ = np.histogram(np.clip(sel.dpo["margin"].to_numpy(), edges[0], edges[-1]), bins=edges)
    margins = pd.DataFrame({"margin from": edges[:-1].round(4), "to": edges[1:].round(4), "pairs": hist})

    winners = pd.crosstab(sel.sft["source"], prompts["domain"].to_numpy()[sel.sft["prompt"].to_numpy()])
    winners["all"] = winners.sum(axis=1)
    winners["share"] = (winners["all"] / max(int(winners["all"].sum()), 1)).round(4)
    winners = winners.reset_index().rename(columns={"row_0": "source"})
    winners.columns.name = None
    return {"counts": counts, "drops": drops, "excluded": excluded, "scores": scores,
            "margins": margins, "winners": winners}


def write_plots(sel: Selection, resp: pd.DataFrame, tables: dict[str, pd.DataFrame], folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    eligible = resp[~np.isnan(resp["reward"].to_numpy())]
    names = sorted(eligible["source"].unique())
    fig, ax = plt.subplots(figsize=(7, 4))
    for name in names:
        ax.hist(eligible.loc[eligible["source"] == name, "reward"], bins=50, histtype="step", label=name)
    ax.set(xlabel="reward", ylabel="responses", title="Scores per source")
    if names:
        ax.legend(fontsize=8)
    out.append(folder / "scores_by_source.png")
    fig.savefig(out[-1], dpi=100, bbox_inches="tight")
    plt.close(fig)

    m = tables["margins"]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(m["margin from"], m["pairs"], width=(m["to"] - m["margin from"]), align="edge", edgecolor="black")
    ax.set(xlabel="score(chosen) - score(rejected)", ylabel="DPO pairs", title="DPO margins")
    out.append(folder / "margins.png")
    fig.savefig(out[-1], dpi=100, bbox_inches="tight")
    plt.close(fig)

    w = tables["winners"]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(w["source"].astype(str), w["share"])
    ax.set(ylabel="share of SFT rows", title="Source of the SFT winners")
    ax.tick_params(axis="x", labelrotation=30)
    out.append(folder / "sft_winners.png")
    fig.savefig(out[-1], dpi=100, bbox_inches="tight")
    plt.close(fig)
    return out


def report_markdown(recipe: Recipe, tables: dict[str, pd.DataFrame], plots: list[Path], base: Path,
                    audit_section: str = "") -> str:
    b = recipe.build
    parts = [
        f"# Build report: {recipe.name}",
        f"Recipe hash `{recipe.content_hash()}`. Band {b.band.low} <= margin <= {b.band.high}; "
        f"SFT fraction {dict(b.sft_fraction)} (other domains: pair if possible, else SFT; chinese: SFT "
        f"only); pair policy `{b.pair_policy}`; band before split: {b.band_before_split}; drop "
        f"truncated: {b.drop_truncated}; test fraction {b.test_fraction}; seed {b.seed}.",
        "## Prompts per data set", markdown_table(tables["counts"]),
        "## Dropped prompts by reason", markdown_table(tables["drops"]) if len(tables["drops"]) else "None.",
        "## Responses left out of selection", markdown_table(tables["excluded"]),
        "## Scores per source (responses with a reward)", markdown_table(tables["scores"]),
        "## DPO margins", markdown_table(tables["margins"]),
        "## Source of the SFT winners", markdown_table(tables["winners"]),
    ]
    if audit_section:
        parts.append(audit_section)
    parts += [f"![{p.stem}]({p.relative_to(base).as_posix()})" for p in plots]
    return "\n\n".join(parts) + "\n"


def run_build(recipe: Recipe) -> Manifest:
    """scores -> datasets/{sft,dpo}/{train,test}.parquet, decisions.parquet, report.md, plots/."""
    import numpy as np
    import pyarrow as pa
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=True)
    manifest = Manifest.start(recipe, "build")
    run = recipe.run_path()
    for dom in SFT_ONLY:
        if dom in recipe.build.sft_fraction:
            raise RecipeError(f"build.sft_fraction.{dom}: the {dom} domain is SFT only; remove this key")
    t0 = time.time()
    with console.status("build: reading prompts, responses and scores"):
        prompts_t, responses_t, prompts, resp = load_inputs(run)
    with console.status(f"build: selecting from {len(resp):,} scored responses"):
        sel = select(prompts, resp, recipe.build, [s.name for s in recipe.sources])
    t_select = time.time() - t0
    out = stage_dir(recipe, "datasets")
    with console.status("build: writing data sets and report"):
        tables = output_tables(sel, prompts_t, responses_t, resp, run / "responses" / "responses.parquet")
        for name, table in tables.items():
            write_table(table, out / f"{name}.parquet", {"sft": SFT, "dpo": DPO}[name.split("/")[0]])
            manifest.outputs[f"{name}.parquet"] = table.num_rows
        ids = resp["response_id"].to_numpy(dtype=object)
        dec = sel.decisions.copy()
        for col, new in (("chosen_row", "chosen_response_id"), ("rejected_row", "rejected_response_id")):
            rows = dec.pop(col).to_numpy()
            dec[new] = np.where(rows >= 0, ids[np.maximum(rows, 0)], None)
        write_table(pa.Table.from_pandas(dec, preserve_index=False), out / "decisions.parquet", DECISIONS)
        manifest.outputs["decisions.parquet"] = len(dec)
        summary = summary_tables(sel, prompts, resp, recipe.build)
        plots = write_plots(sel, resp, summary, out / "plots")
    with console.status("build: auditing the reward model against the checkers"):
        # from the tables just written, as anyone can recompute it; the cards and eval read audit.json
        audit, frame = rm_audit.audit_run(run)
        audit_json = rm_audit.to_json(audit)
        atomic_write_bytes(out / rm_audit.AUDIT_FILE, audit_json.encode())
        audit = json.loads(audit_json)
        plots.append(rm_audit.plot(audit, frame, out / "plots" / rm_audit.PLOT_FILE))
        (out / "report.md").write_text(report_markdown(recipe, summary, plots, out, rm_audit.markdown(audit)))

    manifest.rows_in = len(prompts)
    manifest.rows_out = len(sel.sft) + len(sel.dpo)
    for reason, n in dec.loc[dec["assigned"] == "dropped", "reason"].value_counts().sort_index().items():
        manifest.drop(reason, int(n))
    revisions = responses_t.select(["source", "model_revision"]).to_pandas().drop_duplicates()
    manifest.models = {row.source: str(row.model_revision) for row in revisions.itertuples()}
    manifest.extra = {
        "responses_scored": len(resp),
        "responses_without_score": responses_t.num_rows - len(resp),
        "responses_excluded": {k: int(v) for k, v in sel.excluded[["null_reward", "truncated"]].sum().items()},
        "sft_rows": len(sel.sft), "dpo_rows": len(sel.dpo),
        "by_domain": {f"{d}/{a}": int(n) for (d, a), n in dec.groupby(["domain", "assigned"]).size().items()},
        "select_s": round(t_select, 3),
        "audit_warnings": audit["warnings"],
        "options": recipe.build.model_dump(mode="json"),
    }
    manifest.check_balance()
    manifest.save(out)

    table = Table(title=f"fusechat build: {recipe.name}")
    for col in summary["counts"].columns:
        table.add_column(str(col), justify="right" if col not in ("dataset", "domain") else "left")
    for row in summary["counts"].itertuples(index=False):
        table.add_row(*map(str, row))
    console.print(table)
    if manifest.dropped:
        drops = Table(title="dropped prompts")
        drops.add_column("reason")
        drops.add_column("prompts", justify="right")
        for reason, n in manifest.dropped.items():
            drops.add_row(reason, str(n))
        console.print(drops)
    for w in audit["warnings"]:
        console.print(f"[bold red]WARNING: {w}")
    console.print(f"report: {out / 'report.md'}")
    return manifest
