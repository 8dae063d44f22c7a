"""Views inside a trained model, the library behind `llm inspect`.

One module per view, each returning plain dataclasses that the command prints (`render`), writes
as JSON (`to_json(gen)`, tokens as `llm generate --json` writes them: see `tokens`) or draws
(`plots`): `embeddings` (the token-embedding table, nearest neighbours, PCA), `positions` (the
position table), `attention` (the weights of every head), `score` (the probability of every
token of a text), `lens` (the logit lens), `norms` (the LayerNorm / RMSNorm statistics).
`tokens` turns text into the model's ids and ids into labels.

Every view reads the model through `llmcli.generate.pipeline.load_generator`, so compact
vocabularies and LoRA runs (merged on load) work as they do for `llm generate`.
"""
