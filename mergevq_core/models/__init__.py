from .decoder import Decoder, recover_full, to_grid
from .encoder import AlignHead, EncoderOut, MergeEncoder
from .recovery import SourceRecovery
from .tokenizer import Encoded, MergeVQTokenizer, build_tokenizer

__all__ = [
    "AlignHead", "Decoder", "Encoded", "EncoderOut", "MergeEncoder", "MergeVQTokenizer", "SourceRecovery",
    "build_tokenizer", "recover_full", "to_grid",
]
