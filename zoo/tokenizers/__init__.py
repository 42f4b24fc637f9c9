"""Tokenizers; importing this package registers them."""

from zoo.tokenizers.base import Tokenizer
from zoo.tokenizers.kl_vae import KLVAEConfig, KLVAETokenizer
from zoo.tokenizers.msvq import MSVQConfig, MSVQTokenizer
from zoo.tokenizers.pixel import PixelConfig, PixelTokenizer

__all__ = ["KLVAEConfig", "KLVAETokenizer", "MSVQConfig", "MSVQTokenizer", "PixelConfig", "PixelTokenizer", "Tokenizer"]
