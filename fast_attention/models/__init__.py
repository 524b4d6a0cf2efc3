"""fast_attention.models: a full Transformer (encoder, decoder, encoder-decoder) built on fast_attention's ops."""
from .transformer import KVCache, Transformer, TransformerConfig

__all__ = ["KVCache", "Transformer", "TransformerConfig"]
