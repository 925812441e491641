"""What sct needs from a `data:` config, whichever kind it is (arrays in memory or shards on disk/S3):

    stream = build_stream(cfg.data, batch_size, rank=r, world_size=w)   # next(stream) -> {"x", "labels"?}
    data_shape(cfg.data), num_classes(cfg.data)       # as the config declares: never reads storage
"""
from __future__ import annotations

from pipelines import arrays
from pipelines.arrays import ArrayDataConfig
from pipelines.stream import (
    ShardDataConfig,
    ShardStream,
    shard_data_shape,
    shard_num_classes,
    verified_manifest,
)

DataConfig = ArrayDataConfig | ShardDataConfig


def data_shape(cfg: DataConfig) -> tuple[int, ...]:
    return shard_data_shape(cfg) if isinstance(cfg, ShardDataConfig) else arrays.data_shape(cfg)


def num_classes(cfg: DataConfig) -> int:
    return shard_num_classes(cfg) if isinstance(cfg, ShardDataConfig) else arrays.num_classes(cfg)


def build_stream(cfg: DataConfig, batch_size: int, rank: int = 0, world_size: int = 1):
    """This rank's infinite, exactly resumable batch stream (state_dict / load_state_dict) for the data config.
    Shards: the first storage access; a manifest that differs from the config, bad credentials or an unreachable
    bucket raise ConfigError("data.url" / "data.shape" / "data.num_classes") here, before training starts."""
    if isinstance(cfg, ShardDataConfig):
        return ShardStream(cfg, verified_manifest(cfg), batch_size, rank, world_size)
    x, labels = arrays.load_arrays(cfg)
    return arrays.ArrayStream(x, labels, batch_size, seed=cfg.seed, rank=rank, world_size=world_size)
