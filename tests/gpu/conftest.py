"""GPU tests: marked `gpu`, skipped where CUDA is absent (CI stays green)."""

import pytest
import torch

from hybridgraph.model.config import ModelConfig
from hybridgraph.model.loader import random_model
from hybridgraph.model.tokenizer import ByteTokenizer

# Every module here sets: pytestmark = [pytest.mark.gpu, needs_cuda]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


SMALL = ModelConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=2,
                    num_heads=8, num_kv_heads=4, max_position_embeddings=4096, name="small")


def small_model(dtype: torch.dtype = torch.float32, seed: int = 0):
    return random_model(SMALL, torch.device("cuda"), dtype, seed)


@pytest.fixture
def tokenizer():
    return ByteTokenizer()
