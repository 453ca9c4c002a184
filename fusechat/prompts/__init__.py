"""Prompt data sets -> one canonical prompt table (`<run_dir>/prompts/prompts.parquet`).

`build_prompts(recipe)` reads every data set of the recipe through its adapter, applies the
recipe's filters and writes the table, the dropped prompts and a balanced manifest. The sampling
stage calls it first; an unchanged recipe reuses the existing table.
"""

from fusechat.prompts.stage import PromptDataError, build_prompts, prompts_key

__all__ = ["PromptDataError", "build_prompts", "prompts_key"]
