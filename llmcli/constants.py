"""Facts more than one layer needs (data writes them, the model and the loop read them)."""

IGNORE_INDEX = -100  # a target with this id adds nothing to the loss (prompts, padding)
TOKENIZER_VOCAB = {"cl100k_base": 100277, "bytes": 257}  # ids each built-in tokenizer can produce
RUN_TENSORBOARD = "tensorboard"  # a run's TensorBoard event files (train.tracker)
RUN_TOKENIZERS = "tokenizers"  # an imported run's own tokenizer folder (interop.tokenizer_store)
