"""URSA's image and video tokenizers: pixels <-> code ids (the ``vae/`` of a checkpoint).

``load_tokenizer(folder)`` reads a published folder as it is and picks the family from its
``config.json``: :class:`CosmosFSQTokenizer` (``AutoencoderVQCosmos3D``: FSQ320 video models,
K = 64,000, strides 4 × 8 × 8) or :class:`IBQTokenizer` (``AutoencoderVQ``: IBQ image models,
K = 131,072, stride 16); the bundled digits model's patch codes are a third family
(``PatchTokenizer``, :class:`DigitsPatchTokenizer`). Every tokenizer has ``encode`` /
``decode`` (float pixels in [-1, 1]), ``encode_frames`` / ``decode_frames`` (uint8, the
authors' pre/post-processing), ``latent_shape`` and ``num_frames``; see :mod:`.base`.
"""

from .base import Tokenizer, TokenizerError, to_uint8
from .cosmos3d import CosmosFSQTokenizer
from .ibq import IBQTokenizer
from .loading import FAMILIES, load_tokenizer, read_tokenizer_config, save_tokenizer
from .patch import DigitsPatchTokenizer

__all__ = ["Tokenizer", "TokenizerError", "CosmosFSQTokenizer", "IBQTokenizer", "DigitsPatchTokenizer",
           "FAMILIES", "load_tokenizer", "read_tokenizer_config", "save_tokenizer", "to_uint8"]
