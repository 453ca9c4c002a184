"""Every table a run writes, declared once: its file, its columns with their Arrow types, their meaning.

Writers pass their table's declaration to `fusechat.run.write_table`, which writes exactly these
columns in this order and with these types; readers use `read`, which names the command to run when
the file is missing, turns an unreadable file into an `InputError` naming it, and checks that the
columns the reader needs are there. docs/architecture.md's table section is `markdown()` (a test
keeps them equal; `python -m fusechat.tables docs/architecture.md` rewrites it).

Types are spelled as strings (`string`, `int32`, `list<string>`, `messages` = list of {role,
content} structs, TRL's conversational layout) so that importing this module costs no pyarrow.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

from fusechat.errors import InputError

if TYPE_CHECKING:
    import pyarrow as pa

DOMAINS = ("instruction", "math", "code", "chinese")
MATH_STATUSES = ("correct", "incorrect", "unparseable", "timeout", "error")
CODE_STATUSES = ("pass", "fail", "timeout", "error")
# every value of scores.parquet `check_status`: `none` where no check applies
CHECK_STATUSES = tuple(dict.fromkeys(("none", *MATH_STATUSES, *CODE_STATUSES)))
CHECKS = ("none", "math", "code")
# What a status says of the response, per check (scores.parquet `check`): right, wrong, or neither.
# Neither: `error` (the checker broke) and a math `timeout` (the checker's time limit, not a fault
# of the answer); a code `timeout` is the program's own (an endless loop), so it is wrong. The
# build gates SFT winners and DPO pairs by these, the audit takes them as the truth, eval counts
# RIGHT as correct and everything else as not.
RIGHT = {"math": ("correct",), "code": ("pass",)}
WRONG = {"math": ("incorrect", "unparseable"), "code": ("fail", "timeout")}


@dataclass(frozen=True)
class Column:
    name: str
    type: str
    doc: str = ""


@dataclass(frozen=True)
class Table:
    name: str
    path: str  # relative to the run directory; <...> stands for a name chosen at run time
    doc: str
    columns: tuple[Column, ...]
    internal: bool = False  # a stage's own work files (shards, caches), not read by other stages

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.columns]

    def schema(self, metadata: dict | None = None) -> pa.Schema:
        import pyarrow as pa

        return pa.schema([(c.name, arrow_type(c.type)) for c in self.columns], metadata=metadata)

    def from_rows(self, rows: Iterable[dict], metadata: dict | None = None) -> pa.Table:
        import pyarrow as pa

        return pa.Table.from_pylist(list(rows), schema=self.schema(metadata))

    def conform(self, table: pa.Table) -> pa.Table:
        """`table` with exactly the declared columns, order and types (its metadata kept).

        A writer that produces other columns is a bug in fusechat, not bad input: ValueError.
        """
        have = table.column_names
        if sorted(have) != sorted(self.names):
            extra = [c for c in have if c not in self.names]
            missing = [c for c in self.names if c not in have]
            raise ValueError(f"table {self.name}: writer gives columns {have}; declared {self.names} "
                             f"(missing {missing}, undeclared {extra}): update fusechat/tables.py or the writer")
        table = table.select(self.names)
        return table.cast(self.schema(table.schema.metadata))


def arrow_type(spec: str) -> pa.DataType:
    import pyarrow as pa

    if spec == "messages":
        return pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    if spec.startswith("list<") and spec.endswith(">"):
        return pa.list_(arrow_type(spec[5:-1]))
    return {"string": pa.string(), "large_string": pa.large_string(), "int32": pa.int32(),
            "int64": pa.int64(), "float64": pa.float64(), "bool": pa.bool_()}[spec]


def _t(name: str, path: str, doc: str, *columns: tuple[str, str, str], internal: bool = False) -> Table:
    return Table(name, path, doc, tuple(Column(*c) for c in columns), internal)


_MESSAGES = "list of {role, content}"
PROMPTS = _t(
    "prompts", "prompts/prompts.parquet", "one row per prompt kept from the recipe's data sets",
    ("prompt_id", "string", "content hash of the data set name and the normalized messages"),
    ("dataset", "string", "the recipe's data set name"),
    ("domain", "string", "|".join(DOMAINS)),
    ("messages", "messages", "the conversation up to and including the last user turn"),
    ("gold_answer", "string", "math: the reference final answer; null elsewhere"),
    ("tests", "list<string>", "code: Python assert statements; null elsewhere"),
    ("meta", "string", "JSON object: source row, test setup code (`test_setup`), adapter extras"),
)
DROPPED_PROMPTS = _t(
    "dropped_prompts", "prompts/dropped.parquet", "one row per prompt read but not kept",
    ("prompt_id", "string", "as in prompts.parquet"),
    ("dataset", "string", "the recipe's data set name"),
    ("row", "int64", "row number in the data set file"),
    ("reason", "string", "empty|too_long|off_domain_code|off_domain_math|code_without_tests|duplicate|"
                         "contaminated|near_duplicate|over_limit"),
    ("detail", "string", "what matched, e.g. the prompt it duplicates"),
)
_RESPONSE_COLUMNS = (
    ("response_id", "string", "hash of prompt_id, source, sample index, settings and seed"),
    ("prompt_id", "string", "the prompt answered"),
    ("source", "string", "the recipe's source name"),
    ("model_revision", "string", "pinned revision, or a fingerprint of a local model folder"),
    ("sample_index", "int32", "0..n-1 among the samples of one prompt from one source"),
    ("text", "string", "the response"),
    ("finish_reason", "string", "stop|length|error"),
    ("prompt_tokens", "int32", "tokens of the rendered prompt"),
    ("completion_tokens", "int32", "tokens of the response"),
    ("truncated", "bool", "the response hit max_tokens"),
)
RESPONSES = _t("responses", "responses/responses.parquet", "one row per sampled response", *_RESPONSE_COLUMNS)
RESPONSE_SHARD = _t(
    "response_shard", "responses/shards/<source>/<settings key>/<shard id>.parquet",
    "one shard of sampling work; its prompts, n and what it skipped travel in the file's metadata",
    *_RESPONSE_COLUMNS,
    ("received_ids", "list<int32>", "the prompt token ids the engine received (the one-BOS audit)"),
    internal=True,
)
SCORES = _t(
    "scores", "scores/scores.parquet", "one row per scored response",
    ("response_id", "string", "as in responses.parquet"),
    ("prompt_id", "string", "as in responses.parquet"),
    ("source", "string", "as in responses.parquet"),
    ("domain", "string", "the prompt's domain"),
    ("reward", "float64", "reward-model score; null when the response could not be scored (why: check_detail)"),
    ("objective_rewards", "list<float64>", "ArmoRM's 19 objective scores, or null"),
    ("check", "string", "|".join(CHECKS)),
    ("check_status", "string", "|".join(CHECK_STATUSES)),
    ("check_detail", "string", "what the check found, or why nothing was checked"),
    ("truncated", "bool", "the response, or the reward model's input, was cut"),
)
REWARD_SHARD = _t(
    "reward_shard", "scores/shards/reward-<settings hash>/<hash>.parquet",
    "reward-model scores of one shard of responses",
    ("key", "string", "hash of the response id, its text and its prompt's turns: what the score depends on"),
    ("response_id", "string", ""), ("reward", "float64", ""), ("objective_rewards", "list<float64>", ""),
    ("reward_truncated", "bool", "the reward model's input was cut"),
    ("reward_detail", "string", "why the reward is null"),
    internal=True,
)
CHECK_SHARD = _t(
    "check_shard", "scores/shards/checks-<settings hash>/<hash>.parquet",
    "math and code checks of one shard of responses",
    ("key", "string", "hash of the response id, its text and its prompt's gold answer, tests and setup"),
    ("response_id", "string", ""), ("check", "string", ""), ("check_status", "string", ""),
    ("check_detail", "string", ""),
    internal=True,
)
DECISIONS = _t(
    "decisions", "datasets/decisions.parquet", "one row per prompt: where it went, or why it was dropped",
    ("prompt_id", "large_string", ""), ("dataset", "large_string", ""), ("domain", "large_string", ""),
    ("assigned", "large_string", "sft|dpo|dropped"),
    ("reason", "large_string", "the rule that decided"),
    ("split", "large_string", "train|test; null when dropped"),
    ("source_model", "large_string", "the source of the SFT response or DPO pair"),
    ("chosen_response_id", "large_string", "SFT response or DPO chosen response"),
    ("rejected_response_id", "large_string", "DPO rejected response"),
)
SFT = _t(
    "sft", "datasets/sft/{train,test}.parquet", "SFT rows in TRL's conversational layout",
    ("messages", "messages", "the prompt's turns, then the chosen assistant reply"),
    ("prompt_id", "string", ""), ("dataset", "string", ""), ("domain", "string", ""),
    ("source_model", "string", "the source that wrote the reply"),
    ("score", "float64", "the reply's reward"),
)
DPO = _t(
    "dpo", "datasets/dpo/{train,test}.parquet", "DPO pairs in TRL's conversational layout",
    ("prompt", "messages", "the prompt's turns"),
    ("chosen", "messages", "one assistant message"),
    ("rejected", "messages", "one assistant message"),
    ("prompt_id", "string", ""), ("dataset", "string", ""), ("domain", "string", ""),
    ("source_model", "string", "the source of both replies"),
    ("chosen_score", "float64", ""), ("rejected_score", "float64", ""),
    ("margin", "float64", "chosen_score - rejected_score"),
)
EVAL_GENERATIONS = _t(
    "eval_generations", "eval/generations.parquet", "one row per model and held-out prompt",
    ("model", "string", "source name, target-base, sft or dpo"),
    ("set", "string", "the recipe's benchmark key"),
    ("prompt_id", "string", "the held-out item"),
    ("text", "string", "the model's reply"),
    ("correct", "bool", "the verdict of the set's check; null where the set is judged elsewhere"),
    ("reward", "float64", "the recipe's reward model on the reply"),
    ("domain", "string", ""),
    ("column", "string", "the results column the item counts in"),
    ("check_status", "string", ""), ("check_detail", "string", ""), ("finish_reason", "string", ""),
    ("completion_tokens", "int64", ""), ("model_revision", "string", ""),
)
EVAL_RESULTS = _t(
    "eval_results", "eval/results.parquet", "one row per model, column and metric",
    ("model", "string", ""), ("domain", "string", "the results column"),
    ("metric", "string", ""), ("value", "float64", ""),
)
EVAL_REWARDS = _t(
    "eval_rewards", "eval/work/scores/rewards/<model>-<hash>.parquet", "cached rewards of one model's replies",
    ("key", "string", "the held-out item"), ("reward", "float64", ""),
    internal=True,
)

TABLES: dict[str, Table] = {t.name: t for t in (
    PROMPTS, DROPPED_PROMPTS, RESPONSES, RESPONSE_SHARD, SCORES, REWARD_SHARD, CHECK_SHARD, DECISIONS,
    SFT, DPO, EVAL_GENERATIONS, EVAL_RESULTS, EVAL_REWARDS,
)}


def _writer(table: Table) -> str:
    from fusechat.stages import writer_of

    stage = writer_of(table.name)
    return f"`fusechat {stage.name}`" if stage else "the stage that writes it"


def read(table: Table, path: Path, columns: Sequence[str] | None = None, only: bool = False) -> pa.Table:
    """The Parquet file at `path`, holding (at least) `columns` of `table` (default: all of them);
    with `only`, just those columns are read (a reader that skips the texts of a responses table
    skips gigabytes).

    Every problem is an `InputError` naming the file: missing (with the command that writes it),
    unreadable (truncated or not Parquet), or without a column the reader needs.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not path.exists():
        raise InputError(path, f"missing; run {_writer(table)} first")
    try:
        if only and columns is not None:
            # row group by row group: reading a file whole buffers a third more than it returns
            file = pq.ParquetFile(path)
            cols = [c for c in columns if c in set(file.schema_arrow.names)]
            data = pa.concat_tables([file.read_row_group(g, columns=cols) for g in range(file.num_row_groups)]
                                    or [file.schema_arrow.empty_table().select(cols)])
        else:
            data = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise InputError(path, f"cannot be read as a {table.name} table ({e}): the file is damaged or cut "
                               f"short; run {_writer(table)} again to rewrite it") from None
    wanted = table.names if columns is None else list(columns)
    missing = [c for c in wanted if c not in data.column_names]
    if missing:
        raise InputError(path, f"missing column(s) {', '.join(missing)} of the {table.name} table "
                               f"(docs/architecture.md); present: {', '.join(data.column_names)}")
    return data


def readable(path: Path) -> bool:
    """Whether a Parquet file's footer can be read: a file cut short (a full disk, a copy stopped
    halfway) has none. Cheap: reads the footer only."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pq.read_metadata(path)
    except (pa.ArrowException, OSError):
        return False
    return True


def markdown() -> str:
    """The table section of docs/architecture.md."""
    out = []
    for t in TABLES.values():
        out.append(f"### `{t.path}`{' (internal)' if t.internal else ''}\n\n{t.doc[0].upper() + t.doc[1:]}.\n")
        out.append("| column | type | meaning |\n|---|---|---|")
        for c in t.columns:
            kind = _MESSAGES if c.type == "messages" else c.type
            out.append(f"| `{c.name}` | `{kind}` | {c.doc.replace('|', ' / ')} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


BEGIN, END = "<!-- tables: generated by `python -m fusechat.tables docs/architecture.md` -->", "<!-- tables: end -->"


def rewrite_docs(path: Path) -> bool:
    """Replace the generated section of `path` with `markdown()`; True if it changed."""
    text = path.read_text()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{BEGIN}\n\n{markdown()}\n{END}{tail}"
    if new != text:
        path.write_text(new)
    return new != text


if __name__ == "__main__":
    import sys

    for arg in sys.argv[1:]:
        print(f"{arg}: {'rewritten' if rewrite_docs(Path(arg)) else 'up to date'}")
