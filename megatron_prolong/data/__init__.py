"""Data pipeline: tokenizers, indexed datasets, packing, mixtures, smart batching, SFT chats.

Imports are lazy so that `import megatron_prolong.data` stays cheap (megatron-core's dataset
module pulls in torch and more).
"""
from importlib import import_module

_EXPORTS = {
    "DataConfig": "config", "DomainConfig": "config", "load_mixture": "config",
    "build_tokenizer": "tokenizer", "Tokenizer": "tokenizer",
    "check_tokenizer_matches_model": "tokenizer", "TokenizerMismatchError": "tokenizer",
    "PackedSample": "packing", "collate_packed": "packing", "attention_cost": "packing",
    "build_pretraining_dataset": "mixture", "MixtureDataset": "mixture",
    "RankBatchIterator": "batching", "smart_batch_plan": "batching",
    "render_chat": "chat", "build_demo_corpus": "demo_corpus",
    "DataFileError": "indexed",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
