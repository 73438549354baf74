"""The fusion corpus: tasks, tokenizers and batches.

`tasks` is the embedded reasoning-gym suite with its scorers; `tokenizer` loads or builds the
student's and sources' tokenizers; `datamodule` encodes rows as `[bos] prompt response [eos]`
with the loss on the response, collates them, and serves labelled rows and prompts without gold
(`FusionDataModule`).
"""

# The target of an untrained position (prompt, padding). Here rather than in `datamodule` (which
# imports it too) so that the pure modules reading it, the losses and the alignment, load no Lightning.
IGNORE_INDEX = -100
