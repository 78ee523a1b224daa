"""The built-in formats: one declaration each, its reader module imported on first use.

Listing formats (``entropylens formats``) reads only this table, so it costs no pandas, numpy
or pyarrow; sniffing or reading a file imports the module that implements the format. A
format of another package is added with :func:`entropylens.ingest.registry.register` and
callables in place of the ``"module:function"`` names used here.
"""

from __future__ import annotations

#: Every built-in format, in the order of its module: the fields of
#: :class:`~entropylens.ingest.registry.Format`, with ``sniff`` and ``read`` naming functions
#: of ``entropylens.ingest.<module>``. Plain data, so that this module imports nothing.
BUILTIN_FORMATS: tuple[dict, ...] = (
    dict(name="hf_trainer",
         description="Hugging Face Trainer / TRL trainer_state.json or a JSON list of "
                     "log_history records: step metrics",
         sniff="hf_trainer:sniff_state", read="hf_trainer:read_state",
         produces=("metrics",)),
    dict(name="hf_console",
         description="Hugging Face Trainer / TRL console log (printed log dicts): step metrics",
         sniff="hf_trainer:sniff_console", read="hf_trainer:read_console",
         produces=("metrics",)),
    dict(name="ms_swift",
         description="ms-swift 2.x/3.x logging.jsonl (global_step or global_step/max_steps "
                     "records): step metrics",
         sniff="hf_trainer:sniff_swift", read="hf_trainer:read_swift",
         produces=("metrics",)),
    dict(name="nemo_rl",
         description="NeMo-RL train_data_step<N>.jsonl (token_ids, token_loss_mask, "
                     "generation_logprobs, advantages, rewards)",
         sniff="nemo_rl:sniff", read="nemo_rl:read",
         produces=("tokens", "sequences")),
    dict(name="openai_chat",
         description="Chat Completions responses with logprobs (OpenAI, vLLM, SGLang servers):"
                     " JSONL, JSON, Batch API output or stream chunks",
         sniff="openai:sniff_chat", read="openai:read_chat",
         produces=("tokens", "sequences")),
    dict(name="openai_completion",
         description="legacy Completions responses with logprobs (tokens, token_logprobs, "
                     "top_logprobs dicts, text_offset; echo supported)",
         sniff="openai:sniff_completion", read="openai:read_completion",
         produces=("tokens", "sequences")),
    dict(name="prime_rl",
         description="prime-rl token exports (token_exports/step_<s>/rank_<r>.jsonl): exact "
                     "entropy, inference logprobs, advantages, loss mask",
         sniff="prime_rl:sniff", read="prime_rl:read",
         produces=("tokens", "sequences"), folders=True),
    dict(name="sglang_native",
         description="SGLang /generate responses with meta_info.output_token_logprobs and "
                     "output_top_logprobs ([logprob, token_id, text] triples)",
         sniff="sglang:sniff", read="sglang:read",
         produces=("tokens", "sequences")),
    dict(name="slime",
         description="slime --save-debug-rollout-data dumps (rollout_data_<id>.pt, read with "
                     "weights_only=True): tokens, logprobs, rewards",
         sniff="slime:sniff", read="slime:read",
         produces=("tokens", "sequences")),
    dict(name="table",
         description="Parquet, CSV or JSONL with canonical columns (or --map): tokens, "
                     "sequences, or wide/long step metrics",
         sniff="table:sniff", read="table:read",
         produces=("tokens", "sequences", "metrics")),
    dict(name="tensorboard",
         description="TensorBoard event files, or a folder of them (one run per subfolder): "
                     "step metrics",
         sniff="tensorboard:sniff", read="tensorboard:read",
         produces=("metrics",), folders=True),
    dict(name="tree-json",
         description="Search trees as nested JSON (one tree per document or JSONL line): nodes"
                     " with id, action, prior/logprob, visits, value, reward, children",
         sniff="trees:sniff_json", read="trees:read_json",
         produces=("nodes",)),
    dict(name="tree-table",
         description="Search-tree nodes as a flat table (Parquet, CSV, JSONL) with node_id and"
                     " parent_id",
         sniff="trees:sniff_table", read="trees:read_table",
         produces=("nodes",)),
    dict(name="graph-episodes",
         description="Graph-traversal episodes (JSONL): hops with candidate neighbours and the"
                     " policy's log-probabilities over them",
         sniff="trees:sniff_episodes", read="trees:read_episodes",
         produces=("nodes",)),
    dict(name="trl_completions",
         description="TRL completions/completions_<step>.parquet (step, prompt, completion, "
                     "reward columns, advantage) into sequences",
         sniff="trl_completions:sniff", read="trl_completions:read",
         produces=("sequences",)),
    dict(name="verl_console",
         description="verl console log ('step:N - key:value - ...' lines, Ray prefixes, "
                     "validation dicts): step metrics",
         sniff="verl_logs:sniff_console", read="verl_logs:read_console",
         produces=("metrics",)),
    dict(name="verl_jsonl",
         description="verl FileLogger JSONL ({\"step\": N, \"data\": {...}}): step metrics",
         sniff="verl_logs:sniff_jsonl", read="verl_logs:read_jsonl",
         produces=("metrics",)),
    dict(name="verl_rollout",
         description="verl rollout/validation dumps ({step}.jsonl: input, output, gts, score, "
                     "step, reward extras) into sequences",
         sniff="verl_rollout:sniff", read="verl_rollout:read",
         produces=("sequences",)),
    dict(name="vllm_offline",
         description="vLLM offline RequestOutput dumps (JSON per request, token_id -> "
                     "{logprob, rank, decoded_token}) or printed logprobs reprs; from_vllm() "
                     "for objects",
         sniff="vllm:sniff", read="vllm:read",
         produces=("tokens", "sequences")),
    dict(name="wandb",
         description="W&B run history export (run.history()/scan_history() as CSV, Parquet, "
                     "JSONL or JSON; history artifact): step metrics",
         sniff="wandb:sniff_history", read="wandb:read_history",
         produces=("metrics",)),
    dict(name="wandb_panel",
         description="W&B chart 'Export CSV' (Step, \"<run> - <metric>\" columns; several runs "
                     "per file): step metrics",
         sniff="wandb:sniff_panel", read="wandb:read_panel",
         produces=("metrics",)),
)
