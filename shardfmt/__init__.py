"""shardfmt: the token-shard format (spec, writer, mmap reader, sampler). See FORMAT.md."""

from shardfmt.reader import (CorruptShardError, Dataset, IncompleteDatasetError, Sample,
                             open_dataset)
from shardfmt.spec import FORMAT_VERSION, dtype_max_id, smallest_dtype_for
from shardfmt.tokenizer_info import tokenizer_identity, vocab_hash
from shardfmt.writer import ShardWriter

from shardfmt.megatron import MegatronDataset, export_megatron, open_megatron
from shardfmt.sampler import GlobalSampler, RankIterator

__all__ = ["ShardWriter", "open_dataset", "Dataset", "Sample", "GlobalSampler",
           "RankIterator", "MegatronDataset", "open_megatron", "export_megatron",
           "IncompleteDatasetError", "CorruptShardError", "tokenizer_identity", "vocab_hash",
           "dtype_max_id", "smallest_dtype_for", "FORMAT_VERSION"]
