"""Text generation: decoding strategies with a KV cache, streaming text, and the inspector.

- `decode`: greedy, sampling (temperature, top-k, top-p, min-p, penalties) and beam search on a
  model and token ids; no files, no tokenizer.
- `stream`: token bytes → text without broken characters; stop strings.
- `inspect`: `--show-probs` and `--compare` views.
- `pipeline`: checkpoint + tokenizer → `Generator`; prompt text → finished texts.

Nothing is imported here, so `import llmcli.generate.stream` stays free of torch.
"""
