"""The frozen sources and what turns their outputs into student-space distributions.

`pool` loads the N frozen source LLMs and runs only the selected ones (`SourcePool`); a source
with another tokenizer is aligned to the student by byte offsets (`alignment`), its vocabulary is
mapped onto the student's (`vocab_map`), and where a student token ends inside a source token its
distribution is read as the prefix-range marginal (`marginal`). `cache` stores those outputs
offline, so that a fit can train without running any source.
"""
