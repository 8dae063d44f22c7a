"""Interoperability with transformers: `llm export` (an llm checkpoint as a GPT-2 or Llama
folder) and `llm import` (such a folder, or a Hub id, as an llm run directory).

One job per module: `mapping` (which recipes map to which class, configs, tensor names),
`tokenizer_export` (cl100k_base and bytes as tokenizer.json), `tokenizer_store` (imported
tokenizers), `hf_export`, `hf_import`, `hub` (Hub ids), `staging` (folders written atomically).
"""
