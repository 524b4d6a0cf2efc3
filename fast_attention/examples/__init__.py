"""Examples: `python -m fast_attention.examples.train_decoder` trains a character-level decoder on the shipped
fables.txt and plots its attention maps."""
