"""shardfmt: the token-shard format (spec, writer, mmap reader, sampler). See FORMAT.md."""

from shardfmt.errors import (CorruptShardError, DatasetNotFoundError, IncompleteDatasetError,
                             MixSpecError, ShardfmtError)
from shardfmt.protocol import ConcatDataset, Sample, TokenDataset
from shardfmt.reader import Dataset
from shardfmt.spec import FORMAT_VERSION, dtype_max_id, smallest_dtype_for
from shardfmt.tokenizer_info import tokenizer_identity, vocab_hash
from shardfmt.writer import ShardWriter

from shardfmt.megatron import MegatronBuilder, MegatronDataset, export_megatron, open_megatron
from shardfmt.sampler import GlobalSampler, RankIterator
from shardfmt.sources import open_dataset, open_source

__all__ = ["ShardWriter", "open_dataset", "open_source", "Dataset", "ConcatDataset",
           "TokenDataset", "Sample", "GlobalSampler", "RankIterator", "MegatronDataset",
           "MegatronBuilder", "open_megatron", "export_megatron", "ShardfmtError",
           "DatasetNotFoundError", "IncompleteDatasetError", "CorruptShardError", "MixSpecError",
           "tokenizer_identity", "vocab_hash", "dtype_max_id", "smallest_dtype_for",
           "FORMAT_VERSION"]
