"""Sampling: responses from every source model, resumable shard by shard.

- `render`: a source's own chat template applied once, to token ids with exactly one BOS.
- `engines`: one interface, three engines (vllm, openai-compatible server, transformers).
- `shards`: the content-addressed work plan and the shard files under `responses/shards/`.
- `worker`: the process that loads one source model and computes its shards.
- `stage`: `run_sample(recipe)`, the function behind `fusechat sample` and the Prefect flow.
"""
